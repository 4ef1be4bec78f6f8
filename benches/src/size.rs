//! Byte sizes as people write them in settings (`4GiB`, `256KiB`, `1048576`) and as
//! the report prints them.

/// Parses a byte count with an optional binary unit (`k`/`KiB`, `m`/`MiB`,
/// `g`/`GiB`, any case, a trailing `b` allowed); `None` if it is not one or overflows.
pub fn parse_size(text: &str) -> Option<u64> {
    let lower = text.trim().to_ascii_lowercase();
    let rest = lower.strip_suffix('b').unwrap_or(&lower);
    let rest = rest.strip_suffix('i').unwrap_or(rest);
    let (number, shift) = match rest.as_bytes().last()? {
        b'k' => (&rest[..rest.len() - 1], 10),
        b'm' => (&rest[..rest.len() - 1], 20),
        b'g' => (&rest[..rest.len() - 1], 30),
        _ => (rest, 0),
    };
    number
        .trim()
        .parse::<u64>()
        .ok()?
        .checked_mul(1u64 << shift)
}

/// `bytes` in the largest binary unit that keeps it at or above 1.
pub fn format_size(bytes: u64) -> String {
    let value = bytes as f64;
    match bytes {
        b if b >= 1 << 30 => format!("{:.2} GiB", value / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.0} MiB", value / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.0} KiB", value / (1u64 << 10) as f64),
        b => format!("{b} B"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_binary_units() {
        assert_eq!(parse_size("1048576"), Some(1 << 20));
        assert_eq!(parse_size("256KiB"), Some(256 << 10));
        assert_eq!(parse_size("256k"), Some(256 << 10));
        assert_eq!(parse_size("4GiB"), Some(4 << 30));
        assert_eq!(parse_size(" 64 MiB "), Some(64 << 20));
        assert_eq!(parse_size("2g"), Some(2 << 30));
        assert_eq!(parse_size("16mb"), Some(16 << 20));
    }

    #[test]
    fn refuses_what_is_not_a_size() {
        assert_eq!(parse_size(""), None);
        assert_eq!(parse_size("GiB"), None);
        assert_eq!(parse_size("-1"), None);
        assert_eq!(parse_size("1.5GiB"), None);
        assert_eq!(parse_size("4TiB"), None);
        assert_eq!(parse_size("99999999999999999999GiB"), None);
    }

    #[test]
    fn formats_in_the_largest_unit() {
        assert_eq!(format_size(4 << 30), "4.00 GiB");
        assert_eq!(format_size(512 << 20), "512 MiB");
        assert_eq!(format_size(256 << 10), "256 KiB");
        assert_eq!(format_size(100), "100 B");
    }
}
