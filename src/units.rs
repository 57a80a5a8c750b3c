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
