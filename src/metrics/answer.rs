//! Parsing a model's answer into extracted items, tolerating the usual deviations from
//! "answer with a JSON list of {term, value, unit, category}".
//!
//! Accepted, in this order of attempts:
//! 1. the whole answer (trimmed) as JSON;
//! 2. the contents of the first Markdown code fence (```` ```json ... ``` ````, language tag
//!    optional; an unclosed fence runs to the end);
//! 3. the first balanced `[...]` or `{...}` span in the answer that parses as JSON, found by
//!    a string-aware bracket scan, so leading and trailing prose is ignored.
//!
//! Accepted shapes of the JSON: a list of item objects; an object holding such a list under
//! any key (`{"items": [...]}`, `{"results": [...]}`; the first key whose value is a list of
//! objects wins); a single item object (it has a `term` key); or an object mapping term to
//! scalar value (`{"Hemoglobin": "13.5 g/dL"}`).
//! Item keys: `term` (or `name`, `test`), `value` (or `result`), `unit` (or `units`),
//! `category`. Numbers and booleans are taken as their JSON text; `null` as empty. An item
//! without a term is skipped and counted.
//!
//! Not accepted (the answer is *unparseable*): Python-style single-quoted dicts, trailing
//! commas, or no JSON at all. An unparseable answer scores as zero predicted items.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// One item the model (or the ground truth) states.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    /// The medical term, e.g. `Hemoglobin`.
    pub term: String,
    /// Its value as written, e.g. `13.5`, `120/80`, `negative`.
    #[serde(default)]
    pub value: String,
    /// Its unit as written (`g/dL`), or `None`.
    #[serde(default)]
    pub unit: Option<String>,
    /// Category (e.g. `lab`, `vital`, `medication`), when given.
    #[serde(default)]
    pub category: Option<String>,
}

/// How an answer was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParseStatus {
    /// The answer was clean JSON.
    Clean,
    /// JSON had to be dug out of fences or prose.
    Recovered,
    /// No usable JSON: scored as no items.
    Unparseable,
}

/// A parsed answer.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedAnswer {
    /// Items read, in answer order.
    pub items: Vec<Item>,
    /// How the answer was read.
    pub status: ParseStatus,
    /// Objects that had no term (dropped).
    pub skipped_items: usize,
}

/// Parses a model answer (module doc for the rules). Never fails: junk is
/// [`ParseStatus::Unparseable`] with no items.
pub fn parse_answer(answer: &str) -> ParsedAnswer {
    let trimmed = answer.trim();
    if let Some(p) = serde_json::from_str::<Value>(trimmed)
        .ok()
        .and_then(|v| items_from(&v))
    {
        return finish(p, ParseStatus::Clean);
    }
    if let Some(body) = fenced_block(trimmed) {
        if let Some(p) = serde_json::from_str::<Value>(body.trim())
            .ok()
            .and_then(|v| items_from(&v))
        {
            return finish(p, ParseStatus::Recovered);
        }
    }
    for (start, _) in trimmed
        .char_indices()
        .filter(|(_, c)| *c == '[' || *c == '{')
    {
        let Some(end) = balanced_end(&trimmed[start..]) else {
            continue;
        };
        if let Some(p) = serde_json::from_str::<Value>(&trimmed[start..start + end])
            .ok()
            .and_then(|v| items_from(&v))
        {
            return finish(p, ParseStatus::Recovered);
        }
    }
    ParsedAnswer {
        items: Vec::new(),
        status: ParseStatus::Unparseable,
        skipped_items: 0,
    }
}

fn finish((items, skipped_items): (Vec<Item>, usize), status: ParseStatus) -> ParsedAnswer {
    ParsedAnswer {
        items,
        status,
        skipped_items,
    }
}

/// The text inside the first ``` fence (after its language tag line), if any.
fn fenced_block(s: &str) -> Option<&str> {
    let start = s.find("```")? + 3;
    let after = &s[start..];
    // Skip the language tag (`json`) up to the end of the line.
    let body_start = after.find('\n').map(|i| i + 1).unwrap_or(after.len());
    let body = &after[body_start..];
    Some(match body.find("```") {
        Some(end) => &body[..end],
        None => body,
    })
}

/// Byte length of the balanced bracket span starting at `s[0]` (`[` or `{`), skipping
/// brackets inside JSON strings; `None` when it never closes.
fn balanced_end(s: &str) -> Option<usize> {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        if in_string {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_string = true,
            '[' | '{' => depth += 1,
            ']' | '}' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return Some(i + c.len_utf8());
                }
            }
            _ => {}
        }
    }
    None
}

/// Items from an accepted JSON shape, with the count of skipped term-less objects; `None`
/// for shapes that are not accepted.
fn items_from(v: &Value) -> Option<(Vec<Item>, usize)> {
    match v {
        Value::Array(list) => usable(items_from_list(list), list.len()),
        Value::Object(map) => {
            if field(map, &["term", "name", "test"]).is_some() {
                return Some(items_from_list(std::slice::from_ref(v)));
            }
            if let Some(list) = map.values().find_map(|x| match x {
                Value::Array(l) if l.is_empty() || l.iter().any(Value::is_object) => Some(l),
                _ => None,
            }) {
                return usable(items_from_list(list), list.len());
            }
            if !map.is_empty() && map.values().all(|x| !x.is_object() && !x.is_array()) {
                let items = map
                    .iter()
                    .map(|(k, x)| Item {
                        term: k.clone(),
                        value: scalar_text(x),
                        unit: None,
                        category: None,
                    })
                    .collect();
                return Some((items, 0));
            }
            None
        }
        _ => None,
    }
}

/// A list whose every entry was skipped (`["Hb 13.5"]`) is not an answer in the asked
/// shape; an empty list is (the model found nothing).
fn usable(parsed: (Vec<Item>, usize), len: usize) -> Option<(Vec<Item>, usize)> {
    (len == 0 || !parsed.0.is_empty()).then_some(parsed)
}

fn items_from_list(list: &[Value]) -> (Vec<Item>, usize) {
    let mut items = Vec::new();
    let mut skipped = 0;
    for entry in list {
        let Value::Object(map) = entry else {
            skipped += 1;
            continue;
        };
        let term = field(map, &["term", "name", "test"])
            .map(scalar_text)
            .unwrap_or_default();
        if term.trim().is_empty() {
            skipped += 1;
            continue;
        }
        let opt = |keys: &[&str]| {
            field(map, keys)
                .map(scalar_text)
                .filter(|s| !s.trim().is_empty())
        };
        items.push(Item {
            term,
            value: field(map, &["value", "result"])
                .map(scalar_text)
                .unwrap_or_default(),
            unit: opt(&["unit", "units"]),
            category: opt(&["category"]),
        });
    }
    (items, skipped)
}

/// The first present key among `keys`, matched case-insensitively.
fn field<'a>(map: &'a Map<String, Value>, keys: &[&str]) -> Option<&'a Value> {
    keys.iter().find_map(|k| {
        map.iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(k))
            .map(|(_, v)| v)
    })
}

/// A scalar as text: strings as they are, numbers and booleans as JSON, null as empty;
/// lists and objects as compact JSON.
fn scalar_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(term: &str, value: &str, unit: Option<&str>) -> Item {
        Item {
            term: term.into(),
            value: value.into(),
            unit: unit.map(Into::into),
            category: None,
        }
    }

    #[test]
    fn clean_json_list_parses_with_numbers_as_text() {
        let p = parse_answer(r#"[{"term": "Hb", "value": 13.5, "unit": "g/dL"}]"#);
        assert_eq!(p.status, ParseStatus::Clean);
        assert_eq!(p.items, vec![item("Hb", "13.5", Some("g/dL"))]);
    }

    #[test]
    fn fenced_json_with_prose_around_is_recovered() {
        let a = "Sure! Here are the terms:\n```json\n[{\"term\": \"Glucose\", \"value\": \"5.4\", \"unit\": \"mmol/L\"}]\n```\nLet me know.";
        let p = parse_answer(a);
        assert_eq!(p.status, ParseStatus::Recovered);
        assert_eq!(p.items, vec![item("Glucose", "5.4", Some("mmol/L"))]);
    }

    #[test]
    fn json_inside_prose_without_fence_is_recovered_even_with_brackets_in_strings() {
        let a = r#"The result [see below]: {"items": [{"term": "BP", "value": "120/80 [sitting]"}]} done"#;
        let p = parse_answer(a);
        assert_eq!(p.status, ParseStatus::Recovered);
        assert_eq!(p.items, vec![item("BP", "120/80 [sitting]", None)]);
    }

    #[test]
    fn a_list_under_any_key_and_a_term_value_map_are_accepted() {
        let p = parse_answer(r#"{"results": [{"name": "WBC", "result": "7.2"}]}"#);
        assert_eq!(p.items, vec![item("WBC", "7.2", None)]);
        let p = parse_answer(r#"{"Hemoglobin": "13.5 g/dL", "Pulse": 72}"#);
        assert_eq!(
            p.items,
            vec![
                item("Hemoglobin", "13.5 g/dL", None),
                item("Pulse", "72", None)
            ]
        );
    }

    #[test]
    fn items_without_a_term_are_skipped_and_counted() {
        let p = parse_answer(r#"[{"value": "3"}, "junk", {"term": "Na", "value": null}]"#);
        assert_eq!(p.items, vec![item("Na", "", None)]);
        assert_eq!(p.skipped_items, 2);
    }

    #[test]
    fn an_empty_list_is_a_clean_answer_with_no_items() {
        for a in ["[]", r#"{"items": []}"#] {
            let p = parse_answer(a);
            assert_eq!(p.status, ParseStatus::Clean, "{a}");
            assert!(p.items.is_empty());
        }
    }

    #[test]
    fn a_list_with_no_usable_item_is_unparseable() {
        let p = parse_answer(r#"["Hb 13.5 g/dL", "Na 140"]"#);
        assert_eq!(p.status, ParseStatus::Unparseable);
    }

    #[test]
    fn junk_and_single_quoted_dicts_are_unparseable() {
        for a in [
            "I cannot read this document.",
            "[{'term': 'Hb', 'value': '13'}]",
            "```json\n[{\"term\": \"Hb\",]\n```",
            "",
        ] {
            let p = parse_answer(a);
            assert_eq!(p.status, ParseStatus::Unparseable, "{a}");
            assert!(p.items.is_empty());
        }
    }
}
