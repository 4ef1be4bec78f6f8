//! The CONNECT target: `:authority` is `ip:port` (IPv6 in brackets), never a name.

use std::net::SocketAddr;

/// Why an authority was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthorityError {
    #[error("CONNECT has no :authority")]
    Missing,
    #[error("authority {0:?} is not ip:port (IPv6 in brackets)")]
    NotIpPort(String),
    #[error("authority {0:?} has port 0")]
    ZeroPort(String),
}

/// Parses a CONNECT authority. Host names, zone IDs, user info, a missing or zero
/// port are all refused: HBONE names its target by address.
pub fn parse_authority(authority: Option<&str>) -> Result<SocketAddr, AuthorityError> {
    let s = authority.ok_or(AuthorityError::Missing)?;
    if s.is_empty() {
        return Err(AuthorityError::Missing);
    }
    let addr: SocketAddr = s
        .parse()
        .map_err(|_| AuthorityError::NotIpPort(s.to_string()))?;
    // Canonical form only: "[::ffff:1.2.3.4]:80" style spellings that do not print back
    // the same are still addresses, but a zone ID ("%eth0") or scope does not survive.
    if let SocketAddr::V6(v6) = addr
        && (v6.scope_id() != 0 || v6.flowinfo() != 0)
    {
        return Err(AuthorityError::NotIpPort(s.to_string()));
    }
    if addr.port() == 0 {
        return Err(AuthorityError::ZeroPort(s.to_string()));
    }
    Ok(addr)
}

/// Formats a target as an authority; `SocketAddr` already brackets IPv6.
pub fn format_authority(addr: SocketAddr) -> String {
    addr.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_v4_and_bracketed_v6() {
        assert_eq!(
            parse_authority(Some("198.18.0.7:8080")).unwrap(),
            "198.18.0.7:8080".parse().unwrap()
        );
        assert_eq!(
            parse_authority(Some("[2001:db8::1]:443")).unwrap(),
            "[2001:db8::1]:443".parse().unwrap()
        );
    }

    #[test]
    fn refuses_every_malformed_form() {
        use AuthorityError::*;
        let cases = [
            (None, Missing),
            (Some(""), Missing),
            (Some("example.com:80"), NotIpPort("example.com:80".into())),
            (Some("198.18.0.7"), NotIpPort("198.18.0.7".into())),
            (Some("198.18.0.7:"), NotIpPort("198.18.0.7:".into())),
            (
                Some("198.18.0.7:99999"),
                NotIpPort("198.18.0.7:99999".into()),
            ),
            (Some("2001:db8::1:443"), NotIpPort("2001:db8::1:443".into())),
            (
                Some("[fe80::1%eth0]:80"),
                NotIpPort("[fe80::1%eth0]:80".into()),
            ),
            (
                Some("user@198.18.0.7:80"),
                NotIpPort("user@198.18.0.7:80".into()),
            ),
            (Some("198.018.0.7:80"), NotIpPort("198.018.0.7:80".into())),
            (Some("198.18.0.7:0"), ZeroPort("198.18.0.7:0".into())),
        ];
        for (input, want) in cases {
            assert_eq!(parse_authority(input), Err(want), "input {input:?}");
        }
    }

    proptest! {
        #[test]
        fn format_parse_round_trip(ip in any::<std::net::IpAddr>(), port in 1u16..) {
            let addr = SocketAddr::new(ip, port);
            prop_assert_eq!(parse_authority(Some(&format_authority(addr))).unwrap(), addr);
        }

        #[test]
        fn never_panics(s in "\\PC{0,60}") {
            let _ = parse_authority(Some(&s));
        }
    }
}
