//! The CSV writer of bulkops: one record per [`line`], every cell through the
//! spreadsheet-safe rule ([`cell`]). The HTTP exports, the console and the `bulkops` CLI all
//! write CSV through here, so the rule cannot be forgotten in one of them.
//!
//! The rule is against OWASP's "CSV injection" (CWE-1236).
//!
//! `search.csv` is an audit trail agents open in Excel, and its cells carry record data: a
//! first name such as `=HYPERLINK(…)` or `=cmd|' /C calc'!A0` would run as a formula. A
//! cell that begins with `=`, `+`, `-`, `@`, a tab or a carriage return is therefore written
//! with a leading `'`, which spreadsheets take as "this is text" and hide; the original
//! text is still all there after the quote. JSON answers are never touched.
//!
//! Numbers are exempt: a cell that is a plain decimal number (`-12`, `3.5`) cannot be a
//! formula, and quoting it would turn a negative number into text. Today every numeric
//! column bulkops exports is a positive id, so the exemption only keeps the rule honest for
//! a signed column added later; a text cell such as `-2+3+cmd|…` or `+1 555 0100` is not a
//! plain number and is quoted.

use std::borrow::Cow;

/// Characters that make a spreadsheet read a cell as a formula (OWASP's list).
const TRIGGERS: [char; 6] = ['=', '+', '-', '@', '\t', '\r'];

/// The cell as it must be written: with a leading `'` when it begins with a formula
/// trigger and is not a plain number; otherwise unchanged (and not copied).
pub fn cell(value: &str) -> Cow<'_, str> {
    match value.chars().next() {
        Some(first) if TRIGGERS.contains(&first) && !is_plain_number(value) => {
            Cow::Owned(format!("'{value}"))
        }
        _ => Cow::Borrowed(value),
    }
}

/// `-?digits(.digits)?`: what a spreadsheet reads as a number and nothing else.
fn is_plain_number(value: &str) -> bool {
    let digits = value.strip_prefix('-').unwrap_or(value);
    let (int, frac) = match digits.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (digits, None),
    };
    let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    all_digits(int) && frac.is_none_or(all_digits)
}

/// One CSV record (RFC 4180 quoting), newline-terminated, every cell spreadsheet-safe
/// ([`cell`]). Every CSV bulkops writes goes through here.
pub fn line(fields: &[&str]) -> bytes::Bytes {
    let mut w = csv::WriterBuilder::new()
        .has_headers(false)
        .from_writer(Vec::new());
    let cells: Vec<_> = fields.iter().map(|f| cell(f)).collect();
    // Writing to a Vec cannot fail.
    let _ = w.write_record(cells.iter().map(|c| c.as_bytes()));
    bytes::Bytes::from(w.into_inner().unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formula_triggers_get_a_leading_quote_and_keep_their_text() {
        for hostile in [
            "=HYPERLINK(\"http://evil.example\",\"click\")",
            "=cmd|' /C calc'!A0",
            "+SUM(A1:A2)",
            "-2+3+cmd|' /C calc'!A0",
            "@SUM(A1)",
            "\t=1+1",
            "\r=1+1",
            "-",
            "+1 555 0100",
            "-1e5",
            "--5",
            "-.5",
            "-5.",
        ] {
            assert_eq!(cell(hostile), format!("'{hostile}"), "{hostile:?}");
        }
    }

    #[test]
    fn ordinary_text_and_plain_numbers_are_unchanged() {
        for benign in [
            "",
            "Maria",
            "O'Brien",
            " =leading space",
            "a=b",
            "12345",
            "-12",
            "-0.25",
            "3.5",
            "true",
        ] {
            assert!(
                matches!(cell(benign), Cow::Borrowed(b) if b == benign),
                "{benign:?}"
            );
        }
    }
}
