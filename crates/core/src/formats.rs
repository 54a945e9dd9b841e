//! The strict string formats of module parameters that reach a device's shell: host
//! names, phone numbers and Wi-Fi SSIDs (the schema keyword `format`).
//!
//! `adb shell` joins its arguments with spaces and the phone's `sh` parses the result,
//! so the adb driver quotes every argument it builds (see the worker's `adb::shell`).
//! These formats are the second wall: a value that could only be an attack (`;`, `$(`,
//! a backquote, a quote) is refused with a 422 at enqueue, before it is stored, and the
//! agent checks them again before it runs anything.

/// The formats the catalog uses.
pub const FORMATS: &[&str] = &["hostname", "phone", "ssid"];

/// Why `value` is not of `format`, or `None` when it is.
pub fn check(format: &str, value: &str) -> Option<String> {
    let ok = match format {
        "hostname" => is_host(value),
        "phone" => is_phone(value),
        "ssid" => is_ssid(value),
        other => return Some(format!("has an unknown format {other:?} in its schema")),
    };
    (!ok).then(|| describe(format).to_string())
}

fn describe(format: &str) -> &'static str {
    match format {
        "hostname" => "must be a host name (letters, digits, '-' and '.'), an IPv4 address or an IPv6 address",
        "phone" => "must be a phone number: an optional '+' then 3 to 20 digits, nothing else",
        _ => "must be 1 to 32 characters from letters, digits, space and . _ - + @ # ( )",
    }
}

/// A DNS name (RFC 1123 labels), an IPv4 address or an IPv6 address.
pub fn is_host(s: &str) -> bool {
    if s.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    let name = s.strip_suffix('.').unwrap_or(s);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// `+` (optional) then 3 to 20 ASCII digits.
pub fn is_phone(s: &str) -> bool {
    let digits = s.strip_prefix('+').unwrap_or(s);
    (3..=20).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit())
}

/// 1 to 32 bytes of letters, digits, space and `. _ - + @ # ( )`: what lab networks
/// are named, and nothing a shell gives a meaning to inside quotes.
pub fn is_ssid(s: &str) -> bool {
    (1..=32).contains(&s.len())
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b" ._-+@#()".contains(&b))
        && !s.starts_with(' ')
        && !s.ends_with(' ')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts() {
        for ok in ["8.8.8.8", "example.com", "a-b.example.org.", "::1", "2001:4860:4860::8888", "localhost"] {
            assert!(is_host(ok), "{ok}");
        }
        for bad in ["", "8.8.8.8; reboot", "$(id)", "a..b", "-a.com", "a b", "`id`", "host|sh", "x'y", "a_b.com"] {
            assert!(!is_host(bad), "{bad}");
        }
    }

    #[test]
    fn phones() {
        for ok in ["+33612345678", "112", "0612345678"] {
            assert!(is_phone(ok), "{ok}");
        }
        for bad in ["", "12", "+", "+33 6 12", "06;reboot", "123456789012345678901", "*100#", "+1-202"] {
            assert!(!is_phone(bad), "{bad}");
        }
    }

    #[test]
    fn ssids() {
        for ok in ["lab-5G", "Guest WiFi", "net_(2.4)", "a"] {
            assert!(is_ssid(ok), "{ok}");
        }
        for bad in ["", " lead", "trail ", "x;reboot", "$(id)", "a'b", "a\"b", "a`b", "a\\b", "é", &"x".repeat(33)] {
            assert!(!is_ssid(bad), "{bad}");
        }
    }

    #[test]
    fn check_names_the_rule() {
        assert_eq!(check("phone", "+331"), None);
        assert!(check("phone", "1;2").unwrap().contains("digits"));
        assert!(check("colour", "x").unwrap().contains("unknown format"));
    }
}
