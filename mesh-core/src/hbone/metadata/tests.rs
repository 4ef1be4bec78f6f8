//! Tests of the metadata header parsers: tables of valid and malformed forms, and
//! properties over arbitrary input.

use super::*;
use proptest::prelude::*;

#[test]
fn source_metadata_round_trips_through_headers() {
    let meta = SourceMetadata {
        addr: Some("198.18.1.5".parse().unwrap()),
        namespace: Some("shop".into()),
        workload: Some("cart-7d9f".into()),
        canonical_name: Some("cart".into()),
        canonical_revision: Some("v 2,beta".into()),
        cluster: None,
    };
    let mut h = HeaderMap::new();
    meta.write_headers(&mut h);
    assert_eq!(h[FORWARDED], "for=198.18.1.5");
    assert_eq!(SourceMetadata::from_headers(&h).unwrap(), meta);

    let v6 = SourceMetadata {
        addr: Some("2001:db8::7".parse().unwrap()),
        ..Default::default()
    };
    let mut h = HeaderMap::new();
    v6.write_headers(&mut h);
    assert_eq!(h[FORWARDED], "for=\"[2001:db8::7]\"");
    assert!(h.get(BAGGAGE).is_none());
    assert_eq!(SourceMetadata::from_headers(&h).unwrap(), v6);
}

#[test]
fn forwarded_forms() {
    let ok = [
        ("for=198.18.0.1", Some("198.18.0.1")),
        ("For=\"198.18.0.1\";proto=https", Some("198.18.0.1")),
        (
            "proto=http;for=\"[2001:db8::1]\", for=198.18.9.9",
            Some("2001:db8::1"),
        ),
        ("for=unknown", None),
        ("for=_hidden", None),
        ("by=198.18.0.1", None),
    ];
    for (input, want) in ok {
        let want = want.map(|s| s.parse::<IpAddr>().unwrap());
        assert_eq!(parse_forwarded_for(input), Ok(want), "{input}");
    }
    for bad in [
        "for=example.com",
        "for=[2001:db8::1",
        "garbage",
        "for=198.18.0.1:80",
    ] {
        assert!(parse_forwarded_for(bad).is_err(), "{bad}");
    }
}

#[test]
fn baggage_forms() {
    assert_eq!(
        parse_baggage("a=1, b = x%2Cy ;prop=1,,c=").unwrap(),
        vec![
            ("a".to_string(), "1".to_string()),
            ("b".to_string(), "x,y".to_string()),
            ("c".to_string(), String::new()),
        ]
    );
    for bad in ["novalue", "=v", "a b=c", "k=%zz", "k=%4", "k=a\"b"] {
        assert!(parse_baggage(bad).is_err(), "{bad}");
    }
    let long = format!("k={}", "v".repeat(9000));
    assert_eq!(
        parse_baggage(&long),
        Err(MetadataError::BaggageTooLong(long.len()))
    );
    let many = vec!["k=v"; 181].join(",");
    assert_eq!(
        parse_baggage(&many),
        Err(MetadataError::BaggageTooManyMembers)
    );
}

#[test]
fn traceparent_forms_and_propagation() {
    let s = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let tp = TraceParent::parse(s).unwrap();
    assert_eq!(tp.to_string(), s);
    for bad in [
        "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
    ] {
        assert!(TraceParent::parse(bad).is_err(), "{bad}");
    }
    let mut h = HeaderMap::new();
    h.insert(TRACEPARENT, HeaderValue::from_static(s));
    let child = TraceParent::propagate(&h);
    assert_eq!(child.trace_id, tp.trace_id);
    assert_ne!(child.span_id, tp.span_id);
    let root = TraceParent::propagate(&HeaderMap::new());
    assert_ne!(root.trace_id, [0; 16]);
    assert_eq!(TraceParent::parse(&root.to_string()).unwrap(), root);
}

proptest! {
    #[test]
    fn baggage_values_round_trip(v in "\\PC{0,40}") {
        let header = format!("k={}", percent_encode(&v));
        prop_assert_eq!(parse_baggage(&header).unwrap(), vec![("k".to_string(), v)]);
    }

    #[test]
    fn parsers_never_panic(s in "\\PC{0,120}") {
        let _ = parse_baggage(&s);
        let _ = parse_forwarded_for(&s);
        let _ = TraceParent::parse(&s);
    }
}
