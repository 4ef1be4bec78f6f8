//! Reads the two ztunnel log events the demo summarizes: a completed connection
//! (the access log) and a refused one (with the policy that decided), from
//! tracing's text format (`key=value` fields, strings quoted when Debug-printed).

/// An access-log event.
#[derive(Debug, PartialEq, Eq)]
pub struct Completed {
    pub direction: String,
    pub src: String,
    pub src_workload: String,
    pub src_identity: String,
    pub dst_workload: String,
    pub dst_identity: String,
    pub sent: String,
    pub received: String,
}

/// A refusal.
#[derive(Debug, PartialEq, Eq)]
pub struct Refused {
    pub src: String,
    pub src_identity: String,
    pub dst: String,
    pub policy: String,
    pub explanation: String,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    Completed(Completed),
    Refused(Refused),
}

const REFUSED: &str = "connection refused: ";

/// The value of field `key` in `line`, unquoted; `-` when absent or empty.
fn field(line: &str, key: &str) -> String {
    let pat = format!(" {key}=");
    let Some(start) = line.find(&pat).map(|i| i + pat.len()) else {
        return "-".into();
    };
    let rest = &line[start..];
    let value = match rest.strip_prefix('"') {
        Some(quoted) => quoted.split('"').next().unwrap_or_default(),
        None => rest.split(' ').next().unwrap_or_default(),
    };
    if value.is_empty() {
        "-".into()
    } else {
        value.to_string()
    }
}

/// The refusal's explanation: the message text up to the first field after it.
fn explanation(line: &str) -> Option<String> {
    let start = line.find(REFUSED)? + REFUSED.len();
    let rest = &line[start..];
    let end = [
        " direction=",
        " src=",
        " src_identity=",
        " dst=",
        " reason=",
        " policy=",
    ]
    .iter()
    .filter_map(|k| rest.find(k))
    .min()
    .unwrap_or(rest.len());
    Some(rest[..end].trim().to_string())
}

pub fn parse_event(line: &str) -> Option<Event> {
    if line.contains("connection complete") {
        return Some(Event::Completed(Completed {
            direction: field(line, "direction"),
            src: field(line, "src"),
            src_workload: field(line, "src_workload"),
            src_identity: field(line, "src_identity"),
            dst_workload: field(line, "dst_workload"),
            dst_identity: field(line, "dst_identity"),
            sent: field(line, "bytes_sent"),
            received: field(line, "bytes_received"),
        }));
    }
    let explanation = explanation(line)?;
    Some(Event::Refused(Refused {
        src: field(line, "src"),
        src_identity: field(line, "src_identity"),
        dst: field(line, "dst"),
        policy: field(line, "policy"),
        explanation,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_log_fields() {
        let line = "2026-11-22T03:00:00Z  INFO access: connection complete direction=\"inbound\" src=198.18.1.2:40000 dst=198.18.2.3:8080 src_identity=spiffe://cluster.local/ns/shop/sa/frontend dst_identity=spiffe://cluster.local/ns/shop/sa/reviews src_workload=frontend dst_workload=reviews-v2 bytes_sent=19 bytes_received=19 duration_ms=3 end=\"closed\"";
        let Some(Event::Completed(c)) = parse_event(line) else {
            panic!("not parsed");
        };
        assert_eq!(c.direction, "inbound");
        assert_eq!(c.src, "198.18.1.2:40000");
        assert_eq!(c.src_identity, "spiffe://cluster.local/ns/shop/sa/frontend");
        assert_eq!(c.dst_workload, "reviews-v2");
        assert_eq!(c.sent, "19");
    }

    #[test]
    fn refusal_in_either_field_order() {
        let after = "INFO ztunnel::why: connection refused: no ALLOW policy matched direction=\"inbound\" src=198.18.2.4:5000 src_identity=\"-\" dst=198.18.1.3:8080 reason=\"policy\" policy=\"shop/reviews-callers\"";
        let before = "INFO ztunnel::why: direction=\"inbound\" src=198.18.2.4:5000 dst=198.18.1.3:8080 policy=\"shop/reviews-callers\" connection refused: no ALLOW policy matched";
        for line in [after, before] {
            let Some(Event::Refused(r)) = parse_event(line) else {
                panic!("not parsed: {line}");
            };
            assert_eq!(r.explanation, "no ALLOW policy matched", "{line}");
            assert_eq!(r.policy, "shop/reviews-callers");
            assert_eq!(r.src, "198.18.2.4:5000");
        }
        assert_eq!(parse_event("INFO something else"), None);
    }
}
