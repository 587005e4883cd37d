//! Text from outside (a client's request fields, a server's answers)
//! made safe to print on an operator's terminal.

/// Text someone else chose, made safe for a terminal: control characters,
/// line and paragraph separators and bidirectional overrides are shown
/// escaped (`\u{1b}`), so they cannot move the cursor, erase or start a
/// line, or reorder text. Whoever controls a request's fields (stolen
/// SigV4 credentials are enough) must not be able to blind the reports
/// that expose them.
pub fn printable(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        let hostile = c.is_control()
            || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
        if hostile {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_moves_the_cursor_or_starts_a_line_is_shown_escaped() {
        let hostile = "id\r\u{1b}[2K\nFAKE\u{0}\u{2028}\u{202e}x";
        let shown = printable(hostile);
        assert!(!shown.chars().any(|c| c.is_control()), "{shown}");
        assert!(!shown.contains('\u{2028}') && !shown.contains('\u{202e}'));
        assert!(shown.starts_with("id\\u{d}\\u{1b}[2K\\u{a}FAKE"), "{shown}");
        assert_eq!(printable("arn:aws:iam::1:role/é"), "arn:aws:iam::1:role/é");
    }
}
