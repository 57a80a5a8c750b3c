//! Durations and sizes as people write them in config files and on the
//! command line: `"2m"`, `"500ms"`, `"7d"`; `"1MB"`, `"64MiB"`.

use std::time::Duration;

fn split_unit(text: &str) -> Result<(u64, String), String> {
    let text = text.trim();
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let number = text[..digits]
        .parse::<u64>()
        .map_err(|_| format!("`{text}` does not start with a number"))?;
    Ok((number, text[digits..].trim().to_ascii_lowercase()))
}

/// `"64MB"` → bytes. Both decimal-looking and binary units mean powers of
/// 1024, as in nats-server.
pub fn parse_size(text: &str) -> Result<usize, String> {
    let (n, unit) = split_unit(text)?;
    let scale: u64 = match unit.as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return Err(format!("unknown size unit in `{text}`")),
    };
    n.checked_mul(scale)
        .map(|b| b as usize)
        .ok_or_else(|| format!("size `{text}` is too large"))
}

/// `"2m"` → a duration.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let (n, unit) = split_unit(text)?;
    Ok(match unit.as_str() {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        "d" => Duration::from_secs(n * 86_400),
        _ => return Err(format!("unknown duration unit in `{text}`")),
    })
}

/// Bytes as nats-server's `FriendlyBytes` prints them in its start-up log:
/// powers of 1024 with two decimals, `"11.72 GB"`, `"512 B"`.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KB", "MB", "GB", "TB", "PB", "EB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.2} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_print_as_nats_server_prints_them() {
        assert_eq!(format_size(512), "512 B");
        assert_eq!(format_size(4096), "4.00 KB");
        assert_eq!(format_size(3 << 29), "1.50 GB");
        assert_eq!(format_size(1 << 40), "1.00 TB");
    }
}
