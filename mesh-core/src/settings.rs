//! Parsers and serializers for the settings every Ambit binary shares, so a
//! duration or an address is written, checked and shown the same way everywhere.

use std::net::SocketAddr;
use std::time::Duration;

/// The trimmed text, its leading digits, and the unit after them.
fn number_and_unit(s: &str) -> (&str, &str, &str) {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    (s, num, unit)
}

/// The longest duration a setting takes: ten years. Far beyond any sensible
/// timeout or lifetime, and small enough that code may add or double a setting
/// (`Instant::now() + d`, `d * 2`) without overflowing.
pub const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// `250ms`, `30s`, `5m`, `24h`; zero and more than [`MAX_DURATION`] are refused.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (s, num, unit) = number_and_unit(s);
    let too_long = || {
        format!(
            "{s:?} is too long: at most 10 years ({}h)",
            MAX_DURATION.as_secs() / 3600
        )
    };
    if num.is_empty() {
        return Err(format!(
            "{s:?} is not a duration like 250ms, 30s, 5m or 24h"
        ));
    }
    let secs_per = match unit {
        "ms" => None,
        "s" => Some(1),
        "m" => Some(60),
        "h" => Some(3600),
        _ => return Err(format!("{s:?} has no unit: use ms, s, m or h")),
    };
    // Digits only: a number that does not parse has too many of them.
    let n: u64 = num.parse().map_err(|_| too_long())?;
    let d = match secs_per {
        None => Duration::from_millis(n),
        Some(k) => Duration::from_secs(n.checked_mul(k).ok_or_else(too_long)?),
    };
    if d.is_zero() {
        return Err("a duration must be above zero".into());
    }
    if d > MAX_DURATION {
        return Err(too_long());
    }
    Ok(d)
}

/// A size in bytes: `65536`, `64KiB`, `32MiB`, `1GiB`; zero is refused.
pub fn parse_size(s: &str) -> Result<usize, String> {
    let (s, num, unit) = number_and_unit(s);
    let n: usize = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 65536, 64KiB, 32MiB or 1GiB"))?;
    let shift = match unit {
        "" => 0,
        "KiB" => 10,
        "MiB" => 20,
        "GiB" => 30,
        _ => return Err(format!("{s:?}: the unit must be KiB, MiB or GiB (or none)")),
    };
    let bytes = n
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))?;
    if bytes == 0 {
        return Err("a size must be above zero".into());
    }
    Ok(bytes)
}

/// An address that must stay on the machine (admin endpoints).
pub fn parse_loopback(s: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
    if !addr.ip().is_loopback() {
        return Err(format!(
            "{addr} is not a loopback address; this endpoint must stay local"
        ));
    }
    Ok(addr)
}

/// A packet mark (`SO_MARK`, iptables `--mark`): hex with `0x` (`0x539`, as
/// iptables prints marks) or decimal (`1337`). ztunnel's `--packet-mark` and the
/// node agent's `--proxy-mark` must be the same value, so they read it the same way.
pub fn parse_mark(s: &str) -> Result<u32, String> {
    let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    };
    parsed.map_err(|e| format!("`{s}` is not a mark (hex like 0x539 or decimal): {e}"))
}

/// Serializes a duration as text (`30s`) for the effective-config views.
pub fn duration_as_text<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{d:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86400)));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(
            parse_duration("99999999999999999999x")
                .unwrap_err()
                .contains("unit")
        );
    }

    #[test]
    fn durations_too_long_are_refused_not_wrapped() {
        // 307445734561825861 * 60 wraps to 44 s in u64 arithmetic.
        let wrapping = parse_duration("307445734561825861m").unwrap_err();
        assert!(wrapping.contains("too long"), "{wrapping}");
        assert!(parse_duration("5124095576030432h").is_err());
        assert!(
            parse_duration("99999999999999999999s")
                .unwrap_err()
                .contains("too long")
        );
        // In range, but past the bound a caller may still double or add to.
        assert!(parse_duration("18446744073709551615s").is_err());
        assert!(parse_duration("18446744073709551615ms").is_err());
        assert!(parse_duration("87601h").is_err());
        assert_eq!(parse_duration("87600h"), Ok(MAX_DURATION));
        let doubled = parse_duration("87600h").unwrap() * 2;
        assert!(std::time::Instant::now().checked_add(doubled).is_some());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("64KiB"), Ok(64 << 10));
        assert_eq!(parse_size("32MiB"), Ok(32 << 20));
        assert!(parse_size("0KiB").is_err());
        assert!(parse_size("12kb").is_err());
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("99999999999999999999GiB").is_err());
    }

    #[test]
    fn marks_in_hex_or_decimal() {
        assert_eq!(parse_mark("0x539"), Ok(1337));
        assert_eq!(parse_mark("0X539"), Ok(1337));
        assert_eq!(parse_mark("1337"), Ok(1337));
        assert!(parse_mark("0x").is_err());
        assert!(parse_mark("539x").unwrap_err().contains("539x"));
        assert!(parse_mark("0x1_0000_0000").is_err());
    }

    #[test]
    fn loopback_only() {
        assert!(parse_loopback("127.0.0.1:15000").is_ok());
        assert!(parse_loopback("[::1]:15000").is_ok());
        assert!(
            parse_loopback("0.0.0.0:15000")
                .unwrap_err()
                .contains("loopback")
        );
    }
}
