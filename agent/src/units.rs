//! Byte sizes on the command line (`4M`, `64K`, `100M`) and in human output.

/// Why a size was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SizeError {
    #[error("size {0:?} is empty")]
    Empty(String),
    #[error("size {0:?} is not a number with an optional K, M, G or T suffix (powers of 1024)")]
    Syntax(String),
    #[error("size {0:?} is too large")]
    Overflow(String),
}

/// Parses a byte count: a decimal integer with an optional binary suffix `K`, `M`, `G`, `T`
/// (also `KiB`, `MB`…: every suffix means a power of 1024; a trailing `B` alone means bytes).
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let s = text.trim();
    if s.is_empty() {
        return Err(SizeError::Empty(text.to_owned()));
    }
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, suffix) = s.split_at(digits_end);
    if digits.is_empty() {
        return Err(SizeError::Syntax(text.to_owned()));
    }
    let value: u64 = digits.parse().map_err(|_| SizeError::Overflow(text.to_owned()))?;
    let shift = match suffix.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(SizeError::Syntax(text.to_owned())),
    };
    value
        .checked_mul(1u64 << shift)
        .ok_or_else(|| SizeError::Overflow(text.to_owned()))
}

/// Formats a byte count with a binary unit (`4.0 MiB`).
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4M"), Ok(4 << 20));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("100MiB"), Ok(100 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512B"), Ok(512));
        assert!(matches!(parse_size(""), Err(SizeError::Empty(_))));
        assert!(matches!(parse_size("M"), Err(SizeError::Syntax(_))));
        assert!(matches!(parse_size("4X"), Err(SizeError::Syntax(_))));
        assert!(matches!(parse_size("-4K"), Err(SizeError::Syntax(_))));
        assert!(matches!(parse_size("99999999999T"), Err(SizeError::Overflow(_))));
        assert!(matches!(
            parse_size("99999999999999999999999"),
            Err(SizeError::Overflow(_))
        ));
    }

    #[test]
    fn formatting() {
        assert_eq!(format_size(10), "10 B");
        assert_eq!(format_size(4 << 20), "4.0 MiB");
        assert_eq!(format_size(1536), "1.5 KiB");
    }
}
