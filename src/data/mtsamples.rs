//! MTSamples-style transcript CSV (`description, medical_specialty, sample_name,
//! transcription, keywords`, as in the public MTSamples Kaggle export).
//!
//! Each row becomes a [`Document`]: the sample name as title, the specialty as document
//! type, and an excerpt of the transcription (cut at a sentence end near `max_chars`) as
//! paragraphs. Ground truth comes from the excerpt only, so everything in it is on the page:
//! measured values (`<term> [of|is|was] <number> <unit>`, and vital signs without a unit)
//! and the row's keywords that the excerpt mentions (with an empty value).
//! Rows whose fields are not UTF-8, or that the CSV reader cannot split, are rejected and
//! counted (`encoding_error`, `malformed_row`); the rest of the file is still read.

use std::path::{Path, PathBuf};

use super::document::{Block, Document, Item};
use super::filter::DropReason;
use super::raw::Raw;
use super::DataError;

/// The columns an MTSamples CSV must have.
pub const COLUMNS: [&str; 5] = [
    "description",
    "medical_specialty",
    "sample_name",
    "transcription",
    "keywords",
];

/// Units a value may carry (lower-case, as they appear after the number).
const UNITS: &[&str] = &[
    "mg", "mcg", "g", "kg", "lb", "lbs", "pounds", "ml", "cc", "l", "units", "meq", "mmhg", "bpm",
    "%", "cm", "mm", "mg/dl", "mmol/l", "g/dl", "iu", "degrees", "f", "c", "ng/ml", "u/l", "mg/kg",
    "hours", "days", "weeks", "months", "years",
];

/// Vital signs whose value is often written without a unit (`pulse 72`).
const UNITLESS_TERMS: &[&str] = &[
    "pulse",
    "respirations",
    "respiratory rate",
    "heart rate",
    "temperature",
    "blood pressure",
    "saturation",
    "sat",
    "bp",
    "hr",
    "rr",
];

/// Words that may sit between a term and its number.
const CONNECTORS: &[&str] = &["of", "is", "was", "at", "to", "about", "approximately", ":"];

/// Words that end a term when walking back from the number.
const STOP: &[&str] = &[
    "the", "a", "an", "and", "with", "on", "in", "for", "her", "his", "he", "she", "was", "is",
    "of", "at", "to", "by", "from", "had", "has", "then", "which", "this", "that",
];

/// Opens `path` and checks its header.
///
/// # Errors
/// A missing/unreadable file, or a header without the MTSamples columns (listing both the
/// expected and the found columns).
pub fn open(
    path: &Path,
    max_chars: usize,
) -> Result<impl Iterator<Item = Result<Raw, DataError>> + Send, DataError> {
    let io = |source: std::io::Error| DataError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut reader = csv::ReaderBuilder::new().flexible(true).from_reader(file);
    let header = reader.byte_headers().map_err(|e| DataError::Format {
        path: path.to_path_buf(),
        message: format!("reading the CSV header: {e}"),
    })?;
    let found: Vec<String> = header
        .iter()
        .map(|h| String::from_utf8_lossy(h).trim().to_string())
        .collect();
    let mut index = [0usize; 5];
    for (slot, col) in index.iter_mut().zip(COLUMNS) {
        match found.iter().position(|f| f == col) {
            Some(i) => *slot = i,
            None => {
                return Err(DataError::MissingColumns {
                    path: path.to_path_buf(),
                    expected: COLUMNS.iter().map(|s| s.to_string()).collect(),
                    found,
                })
            }
        }
    }
    let path: PathBuf = path.to_path_buf();
    Ok(reader
        .into_byte_records()
        .enumerate()
        .map(move |(row, rec)| {
            let rec = match rec {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(path = %path.display(), row, error = %e, "malformed CSV row");
                    return Ok(Raw::Rejected {
                        reason: DropReason::MalformedRow,
                    });
                }
            };
            let mut fields = Vec::with_capacity(5);
            for &i in &index {
                match std::str::from_utf8(rec.get(i).unwrap_or(b"")) {
                    Ok(s) => fields.push(s.to_string()),
                    Err(_) => {
                        return Ok(Raw::Rejected {
                            reason: DropReason::EncodingError,
                        })
                    }
                }
            }
            let [description, specialty, sample_name, transcription, keywords]: [String; 5] =
                fields.try_into().expect("five fields were pushed");
            Ok(Raw::Doc(document(
                row,
                &description,
                &specialty,
                &sample_name,
                &transcription,
                &keywords,
                max_chars,
            )))
        }))
}

/// `Cardiovascular / Pulmonary` → `cardiovascular_pulmonary`.
fn snake(s: &str) -> String {
    let mut out = String::new();
    for w in s
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
    {
        if !out.is_empty() {
            out.push('_');
        }
        out.push_str(&w.to_ascii_lowercase());
    }
    out
}

/// The first `max_chars` of `text`, cut after the last sentence end (else the last space).
fn excerpt(text: &str, max_chars: usize) -> String {
    let clean = text.replace(":,", ":").replace(" ,", ",");
    let clean = clean.split_whitespace().collect::<Vec<_>>().join(" ");
    if clean.chars().count() <= max_chars {
        return clean;
    }
    let cut: String = clean.chars().take(max_chars).collect();
    match cut.rfind(". ") {
        Some(i) if i > max_chars / 3 => cut[..=i].to_string(),
        _ => match cut.rfind(' ') {
            Some(i) => cut[..i].to_string(),
            None => cut,
        },
    }
}

fn document(
    row: usize,
    description: &str,
    specialty: &str,
    sample_name: &str,
    transcription: &str,
    keywords: &str,
    max_chars: usize,
) -> Document {
    let body = excerpt(transcription, max_chars);
    let mut items = values(&body);
    let lower = body.to_lowercase();
    let specialty_key = specialty.trim().to_lowercase();
    for kw in keywords.split(',').map(str::trim).filter(|k| k.len() > 2) {
        let k = kw.to_lowercase();
        if k == specialty_key || items.iter().any(|i| i.term.to_lowercase() == k) {
            continue;
        }
        if let Some(pos) = lower.find(&k) {
            // The term as printed (original case), so it is on the page.
            let printed = body.get(pos..pos + k.len()).unwrap_or(kw);
            items.push(Item::new(printed, "", "", "keyword"));
        }
    }
    let mut blocks = vec![Block::Fields {
        columns: 1,
        fields: vec![
            ("Specialty".into(), specialty.trim().to_string()),
            ("Description".into(), description.trim().to_string()),
        ],
    }];
    blocks.push(Block::Paragraph(body));
    Document {
        id: format!("mts-{row:05}"),
        doc_type: snake(specialty),
        title: sample_name.trim().to_string(),
        blocks,
        ground_truth: items,
    }
}

fn is_number(tok: &str) -> bool {
    let t = tok.trim_end_matches([',', '.', ';', ')']);
    !t.is_empty()
        && t.chars().next().is_some_and(|c| c.is_ascii_digit())
        && t.chars()
            .all(|c| c.is_ascii_digit() || c == '.' || c == '/')
        && !t.ends_with('/')
}

/// `<term> [connector] <number> [unit]` values in `text`, terms and values as printed.
pub fn values(text: &str) -> Vec<Item> {
    let toks: Vec<&str> = text.split_whitespace().collect();
    let mut out: Vec<Item> = Vec::new();
    for i in 0..toks.len() {
        if !is_number(toks[i]) {
            continue;
        }
        let value = toks[i].trim_end_matches([',', '.', ';', ')']);
        let next = toks
            .get(i + 1)
            .map(|t| t.trim_end_matches([',', '.', ';', ')']));
        let unit = next.filter(|u| UNITS.contains(&u.to_lowercase().as_str()));
        // Walk back over one connector, then collect up to three term words.
        let mut j = i;
        if j > 0 && CONNECTORS.contains(&toks[j - 1].to_lowercase().as_str()) {
            j -= 1;
        }
        let mut words: Vec<&str> = Vec::new();
        while j > 0 && words.len() < 3 {
            let w = toks[j - 1];
            let bare = w;
            // A word ending a clause, or a heading (`SIGNS:`), ends the term.
            let ends_clause =
                w.ends_with(',') || w.ends_with('.') || w.ends_with(';') || w.ends_with(':');
            if ends_clause
                || bare.is_empty()
                || !bare
                    .chars()
                    .all(|c| c.is_alphabetic() || c == '-' || c == '2')
                || STOP.contains(&bare.to_lowercase().as_str())
            {
                break;
            }
            words.insert(0, bare);
            j -= 1;
        }
        if words.is_empty() {
            continue;
        }
        let term = words.join(" ");
        let unitless = UNITLESS_TERMS.contains(&term.to_lowercase().as_str());
        let unit = match unit {
            Some(u) => u.to_string(),
            None if unitless => String::new(),
            None => continue,
        };
        if out.iter().any(|o| o.term == term) {
            continue;
        }
        out.push(Item::new(&term, value, &unit, "measurement"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const CSV: &str = "description,medical_specialty,sample_name,transcription,keywords\n\
\"Chest pain.\",\" Cardiovascular / Pulmonary\",\"Chest Pain Consult\",\"HISTORY:, Chest pain for 2 days. VITAL SIGNS:, Blood pressure 150/90, pulse 88, temperature 98.6. Lisinopril 10 mg daily. Weight is 82 kg.\",\"cardiovascular / pulmonary, chest pain, lisinopril\"\n";

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    #[test]
    fn rows_become_documents_with_values_and_keywords_from_the_text() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "m.csv", CSV.as_bytes());
        let raws: Vec<Raw> = open(&p, 900).unwrap().map(Result::unwrap).collect();
        let Raw::Doc(doc) = &raws[0] else {
            panic!("{raws:?}")
        };
        assert_eq!(doc.doc_type, "cardiovascular_pulmonary");
        assert_eq!(doc.title, "Chest Pain Consult");
        let got: Vec<(&str, &str, &str)> = doc
            .ground_truth
            .iter()
            .map(|i| (i.term.as_str(), i.value.as_str(), i.unit.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("Blood pressure", "150/90", ""),
                ("pulse", "88", ""),
                ("temperature", "98.6", ""),
                ("Lisinopril", "10", "mg"),
                ("Weight", "82", "kg"),
                ("Chest pain", "", ""),
            ]
        );
        let text = doc.plain_text();
        assert!(doc.ground_truth.iter().all(|i| text.contains(&i.term)));
    }

    #[test]
    fn missing_columns_are_listed_with_what_was_found() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "bad.csv", b"description,text\nx,y\n");
        let err = open(&p, 900).err().unwrap().to_string();
        assert!(err.contains("bad.csv"), "{err}");
        assert!(err.contains("\"transcription\""), "{err}");
        assert!(err.contains("found [\"description\", \"text\"]"), "{err}");
    }

    #[test]
    fn a_non_utf8_row_is_rejected_and_the_next_row_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes =
            b"description,medical_specialty,sample_name,transcription,keywords\n".to_vec();
        bytes.extend_from_slice(b"d,s,n,\"bad \xff\xfe text 5 mg\",k\n");
        bytes.extend_from_slice(CSV.lines().nth(1).unwrap().as_bytes());
        bytes.push(b'\n');
        let p = write(dir.path(), "enc.csv", &bytes);
        let raws: Vec<Raw> = open(&p, 900).unwrap().map(Result::unwrap).collect();
        assert!(matches!(
            raws[0],
            Raw::Rejected {
                reason: DropReason::EncodingError
            }
        ));
        assert!(matches!(raws[1], Raw::Doc(_)));
    }

    #[test]
    fn a_missing_file_names_its_path() {
        let err = open(Path::new("/nonexistent/mtsamples.csv"), 900)
            .err()
            .unwrap();
        assert!(err.to_string().contains("/nonexistent/mtsamples.csv"));
    }

    #[test]
    fn excerpts_end_at_a_sentence() {
        let e = excerpt(
            "One two three. Four five six. Seven eight nine ten eleven.",
            35,
        );
        assert_eq!(e, "One two three. Four five six.");
    }
}
