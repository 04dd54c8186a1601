//! Normalization of extracted terms, values and units before they are compared.
//!
//! The rules, each chosen so that two spellings a clinician would read as the same thing
//! compare equal, and nothing else does:
//!
//! **Terms** ([`term`]): Unicode lower case; every character that is not a letter or digit
//! (punctuation, `-`, `/`, brackets) becomes a space; runs of whitespace collapse to one
//! space; ends are trimmed. `"Hemoglobin (Hb)"` → `"hemoglobin hb"`, `"WBC-Count "` →
//! `"wbc count"`.
//!
//! **Values** ([`value`]):
//! - Whitespace is trimmed; a value that is a plain decimal number is put in canonical form:
//!   a leading `+` is dropped, thousands separators (`,` before each group of exactly three
//!   digits) are removed, leading zeros of the integer part and trailing zeros of the fraction
//!   are dropped, a bare `.5` gains its `0`, `-0` becomes `0`. So `"7.40"` == `"7.4"`,
//!   `"1,000"` == `"1000"`, `"+5"` == `"5"`. Exponent notation (`1e3`) is left as text.
//! - Anything else (ranges `4.5-6.0`, ratios `120/80`, words `negative`) is text: lower case,
//!   all whitespace removed, and every maximal run of digits, `.` and `,` inside it
//!   canonicalized as a number. So `"120 / 80"` == `"120/80"` and `"4.50 - 6.0"` == `"4.5-6"`.
//!
//! **Units** ([`unit`]): lower case (`mg/dL` == `mg/dl`); all whitespace removed; the micro
//! sign `µ` (U+00B5) and Greek `μ` (U+03BC) become `u`, and so does `mc` at the start of the
//! unit or after `/` when a letter follows (`mcg` == `µg` == `ug`, `mcL` == `uL`);
//! superscript digits become digits and `^` is dropped (`10⁹/L` == `10^9/L`); `×` becomes
//! `x`. An empty unit is no unit.
//!
//! **Value with the unit inside** ([`split_value_unit`]): when a prediction has no unit and
//! its value is a number followed by text (`"13.5 g/dL"`), the text is taken as its unit.

/// Normalized term: lower case, punctuation to spaces, whitespace collapsed (module doc).
pub fn term(raw: &str) -> String {
    let spaced: String = raw
        .chars()
        .flat_map(char::to_lowercase)
        .map(|c| if c.is_alphanumeric() { c } else { ' ' })
        .collect();
    spaced.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Normalized value: canonical number, or lower-case text without whitespace whose numbers
/// are canonical (module doc).
pub fn value(raw: &str) -> String {
    let t = raw.trim();
    if let Some(n) = canonical_number(t) {
        return n;
    }
    let text: String = t
        .chars()
        .flat_map(char::to_lowercase)
        .filter(|c| !c.is_whitespace())
        .collect();
    canonicalize_embedded_numbers(&text)
}

/// Normalized unit, `None` when empty (module doc).
pub fn unit(raw: &str) -> Option<String> {
    let mut s = String::with_capacity(raw.len());
    for c in raw.chars().flat_map(char::to_lowercase) {
        match c {
            c if c.is_whitespace() => {}
            '\u{b5}' | '\u{3bc}' => s.push('u'),
            '^' => {}
            '×' => s.push('x'),
            '⁰' => s.push('0'),
            '¹' => s.push('1'),
            '²' => s.push('2'),
            '³' => s.push('3'),
            '⁴' => s.push('4'),
            '⁵' => s.push('5'),
            '⁶' => s.push('6'),
            '⁷' => s.push('7'),
            '⁸' => s.push('8'),
            '⁹' => s.push('9'),
            c => s.push(c),
        }
    }
    // `mc` as the micro prefix: at the start or after `/`, followed by a letter.
    let chars: Vec<char> = s.chars().collect();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < chars.len() {
        let at_start = i == 0 || chars[i - 1] == '/';
        if at_start
            && chars[i] == 'm'
            && chars.get(i + 1) == Some(&'c')
            && chars.get(i + 2).is_some_and(|c| c.is_alphabetic())
        {
            out.push('u');
            i += 2;
        } else {
            out.push(chars[i]);
            i += 1;
        }
    }
    (!out.is_empty()).then_some(out)
}

/// Splits `"13.5 g/dL"` into the number and the unit text, when the value starts with a
/// plain number followed by whitespace and something that is not a number; else `None`.
pub fn split_value_unit(raw: &str) -> Option<(String, String)> {
    let t = raw.trim();
    let (num, rest) = t.split_once(char::is_whitespace)?;
    let rest = rest.trim();
    let first = rest.chars().next()?;
    if canonical_number(num).is_none() || !(first.is_alphabetic() || "%µμ/".contains(first)) {
        return None;
    }
    Some((num.to_string(), rest.to_string()))
}

/// Canonical form of a plain decimal number (`[+-]digits[.digits]`, optional thousands
/// commas), or `None` when `s` is not one.
fn canonical_number(s: &str) -> Option<String> {
    let (neg, body) = match s.as_bytes().first()? {
        b'+' => (false, &s[1..]),
        b'-' => (true, &s[1..]),
        _ => (false, s),
    };
    let (int, frac) = match body.split_once('.') {
        Some((i, f)) => (i, f),
        None => (body, ""),
    };
    if int.is_empty() && frac.is_empty() {
        return None;
    }
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let int = strip_thousands(int)?;
    let int = int.trim_start_matches('0');
    let frac = frac.trim_end_matches('0');
    let int = if int.is_empty() { "0" } else { int };
    let mut out = String::new();
    if neg && !(int == "0" && frac.is_empty()) {
        out.push('-');
    }
    out.push_str(int);
    if !frac.is_empty() {
        out.push('.');
        out.push_str(frac);
    }
    Some(out)
}

/// Digits of an integer part, with `1,000,000`-style separators removed; `None` when the
/// text is not digits or the commas are not thousands separators.
fn strip_thousands(int: &str) -> Option<String> {
    if !int.contains(',') {
        return int
            .bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| int.to_string());
    }
    let groups: Vec<&str> = int.split(',').collect();
    let first_ok = (1..=3).contains(&groups[0].len());
    let rest_ok = groups[1..].iter().all(|g| g.len() == 3);
    let digits_ok = groups.iter().all(|g| g.bytes().all(|b| b.is_ascii_digit()));
    (first_ok && rest_ok && digits_ok).then(|| groups.concat())
}

/// Replaces every maximal run of digits, `.` and `,` in `text` by its canonical number
/// (runs that are not numbers, such as a lone `.`, stay as they are).
fn canonicalize_embedded_numbers(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut run = String::new();
    let flush = |run: &mut String, out: &mut String| {
        if !run.is_empty() {
            match canonical_number(run) {
                Some(n) => out.push_str(&n),
                None => out.push_str(run),
            }
            run.clear();
        }
    };
    for c in text.chars() {
        if c.is_ascii_digit() || c == '.' || c == ',' {
            run.push(c);
        } else {
            flush(&mut run, &mut out);
            out.push(c);
        }
    }
    flush(&mut run, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_compare_by_value_not_spelling() {
        assert_eq!(value("7.4"), value("7.40"));
        assert_eq!(value("1,000"), "1000");
        assert_eq!(value("1,234,567.50"), "1234567.5");
        assert_eq!(value("+5"), "5");
        assert_eq!(value(" 007 "), "7");
        assert_eq!(value(".5"), "0.5");
        assert_eq!(value("5."), "5");
        assert_eq!(value("-0.0"), "0");
        assert_eq!(value("-3.10"), "-3.1");
        assert_ne!(value("7.4"), value("7.41"));
    }

    #[test]
    fn misplaced_commas_are_text_not_thousands() {
        // "1,00" is not a thousands grouping (it may be a decimal comma): keep it as text.
        assert_eq!(value("1,00"), "1,00");
        assert_ne!(value("1,00"), value("100"));
    }

    #[test]
    fn ranges_and_ratios_are_text_with_canonical_numbers() {
        assert_eq!(value("120/80"), "120/80");
        assert_eq!(value("120 / 80"), "120/80");
        assert_eq!(value("4.50 - 6.0"), "4.5-6");
        assert_eq!(value("Negative"), "negative");
        assert_eq!(value("1e3"), "1e3");
    }

    #[test]
    fn units_ignore_case_spaces_and_micro_spelling() {
        assert_eq!(unit("mg/dL"), unit("mg/dl"));
        assert_eq!(unit("mg / dL"), Some("mg/dl".into()));
        assert_eq!(unit("µg/L"), Some("ug/l".into()));
        assert_eq!(unit("μg/L"), unit("mcg/L"));
        assert_eq!(unit("mcL"), Some("ul".into()));
        assert_eq!(unit("mmol/L"), Some("mmol/l".into()));
        assert_eq!(unit("x10^9/L"), unit("×10⁹/L"));
        assert_eq!(unit("  "), None);
        assert_ne!(unit("mg/dL"), unit("g/dL"));
    }

    #[test]
    fn terms_ignore_case_punctuation_and_spacing() {
        assert_eq!(term("Hemoglobin (Hb)"), "hemoglobin hb");
        assert_eq!(term("  WBC-Count "), term("wbc count"));
        assert_eq!(term("HbA1c"), "hba1c");
        assert_ne!(term("glucose"), term("glucose fasting"));
    }

    #[test]
    fn a_value_with_its_unit_inside_is_split() {
        assert_eq!(
            split_value_unit("13.5 g/dL"),
            Some(("13.5".into(), "g/dL".into()))
        );
        assert_eq!(split_value_unit("98 %"), Some(("98".into(), "%".into())));
        assert_eq!(split_value_unit("120/80"), None);
        assert_eq!(split_value_unit("4.5 - 6.0"), None);
        assert_eq!(split_value_unit("not detected"), None);
    }
}
