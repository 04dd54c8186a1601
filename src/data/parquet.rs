//! Hugging Face datasets-style parquet shards, read row by row with the `parquet` crate's
//! record API (no arrow), through a configurable column mapping.
//!
//! Presets: `pathvqa` (`image{bytes,path}`, `question`, `answer`, as in the PathVQA parquet
//! export on the Hub) and `pubmedvision` (`image`: a path or list of paths relative to
//! `image_root`, `conversations`: a list of `{from, value}` turns or that list as a JSON
//! string; the first `human` turn is the question, the next `gpt` turn the answer).
//! A row without a usable image is rejected as `decode_error`, one without question or
//! answer as `empty_text`, and an unreadable row as `malformed_row`; the stage goes on.

use std::path::{Path, PathBuf};

use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::{Field, Row};
use serde::{Deserialize, Serialize};

use super::document::Item;
use super::filter::DropReason;
use super::raw::Raw;
use super::DataError;

/// Known dataset layouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Preset {
    /// `image{bytes,path}, question, answer`.
    Pathvqa,
    /// `image` (path or list of paths), `conversations`.
    Pubmedvision,
}

/// Which column holds what; unset entries come from the preset.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ColumnMap {
    /// Image: a `{bytes, path}` struct, raw bytes, a path, or a list of paths.
    pub image: Option<String>,
    /// Question text (or use `conversations`).
    pub question: Option<String>,
    /// Answer text (or use `conversations`).
    pub answer: Option<String>,
    /// Conversation turns `{from, value}` (list or JSON string).
    pub conversations: Option<String>,
}

impl ColumnMap {
    /// The preset's mapping overlaid with the explicit entries.
    pub fn resolve(&self, preset: Option<Preset>) -> ColumnMap {
        let base = match preset {
            Some(Preset::Pathvqa) => ColumnMap {
                image: Some("image".into()),
                question: Some("question".into()),
                answer: Some("answer".into()),
                conversations: None,
            },
            Some(Preset::Pubmedvision) => ColumnMap {
                image: Some("image".into()),
                conversations: Some("conversations".into()),
                ..ColumnMap::default()
            },
            None => ColumnMap::default(),
        };
        ColumnMap {
            image: self.image.clone().or(base.image),
            question: self.question.clone().or(base.question),
            answer: self.answer.clone().or(base.answer),
            conversations: self.conversations.clone().or(base.conversations),
        }
    }

    fn names(&self) -> Vec<String> {
        [
            &self.image,
            &self.question,
            &self.answer,
            &self.conversations,
        ]
        .into_iter()
        .flatten()
        .cloned()
        .collect()
    }
}

/// The parquet files at `path`: the file itself, or every `*.parquet` under the directory
/// (sorted, so shard order is stable).
fn files(path: &Path) -> Result<Vec<PathBuf>, DataError> {
    let io = |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    if !meta.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut out = Vec::new();
    let mut stack = vec![path.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).map_err(io)?.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "parquet") {
                out.push(p);
            }
        }
    }
    out.sort();
    if out.is_empty() {
        return Err(DataError::Format {
            path: path.to_path_buf(),
            message: "no .parquet files in this directory".into(),
        });
    }
    Ok(out)
}

fn open_file(path: &Path) -> Result<SerializedFileReader<std::fs::File>, DataError> {
    let f = std::fs::File::open(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    SerializedFileReader::new(f).map_err(|e| DataError::Format {
        path: path.to_path_buf(),
        message: format!("not a readable parquet file: {e}"),
    })
}

/// Opens every shard, checks that the mapped columns exist, and streams the rows.
///
/// # Errors
/// A missing path, an unreadable parquet file, a mapping with neither question/answer nor
/// conversations, or a mapped column missing from a file (expected vs found columns).
pub fn open(
    path: &Path,
    columns: &ColumnMap,
    image_root: Option<&Path>,
    doc_type: &str,
) -> Result<impl Iterator<Item = Result<Raw, DataError>> + Send, DataError> {
    let map = columns.clone();
    let has_qa = map.question.is_some() && map.answer.is_some();
    if map.image.is_none() || !(has_qa || map.conversations.is_some()) {
        return Err(DataError::Format {
            path: path.to_path_buf(),
            message: "the column mapping needs `image` and either `question` + `answer` or `conversations` (or a preset)".into(),
        });
    }
    let files = files(path)?;
    let mut readers = Vec::with_capacity(files.len());
    for f in &files {
        let reader = open_file(f)?;
        let found: Vec<String> = reader
            .metadata()
            .file_metadata()
            .schema_descr()
            .root_schema()
            .get_fields()
            .iter()
            .map(|t| t.name().to_string())
            .collect();
        if map.names().iter().any(|c| !found.contains(c)) {
            return Err(DataError::MissingColumns {
                path: f.clone(),
                expected: map.names(),
                found,
            });
        }
        readers.push((f.clone(), reader));
    }
    let doc_type = doc_type.to_string();
    let root_override = image_root.map(Path::to_path_buf);
    Ok(readers.into_iter().flat_map(move |(file, reader)| {
        let stem = file
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let root = root_override
            .clone()
            .or_else(|| file.parent().map(Path::to_path_buf))
            .unwrap_or_default();
        let map = map.clone();
        let doc_type = doc_type.clone();
        reader.into_iter().enumerate().map(move |(i, row)| {
            let id = format!("{stem}-{i:06}");
            Ok(match row {
                Err(e) => {
                    tracing::warn!(file = %file.display(), row = i, error = %e, "unreadable parquet row");
                    Raw::Rejected { reason: DropReason::MalformedRow }
                }
                Ok(row) => to_raw(&row, &map, &root, id, &doc_type),
            })
        })
    }))
}

fn get<'a>(row: &'a Row, name: &str) -> Option<&'a Field> {
    row.get_column_iter()
        .find(|(n, _)| *n == name)
        .map(|(_, f)| f)
}

fn text(f: &Field) -> Option<String> {
    match f {
        Field::Str(s) => Some(s.clone()),
        Field::Bytes(b) => std::str::from_utf8(b.data()).ok().map(str::to_string),
        _ => None,
    }
}

/// The image bytes a field refers to: inline bytes, or a file under `root`.
fn image_bytes(f: &Field, root: &Path) -> Option<Vec<u8>> {
    match f {
        Field::Bytes(b) => Some(b.data().to_vec()),
        Field::Str(p) => std::fs::read(root.join(p)).ok(),
        Field::Group(g) => {
            if let Some(Field::Bytes(b)) = get(g, "bytes") {
                return Some(b.data().to_vec());
            }
            match get(g, "path") {
                Some(Field::Str(p)) => std::fs::read(root.join(p)).ok(),
                _ => None,
            }
        }
        Field::ListInternal(list) => list.elements().first().and_then(|e| image_bytes(e, root)),
        _ => None,
    }
}

#[derive(Deserialize)]
struct Turn {
    from: String,
    value: String,
}

/// (question, answer) from conversation turns: first `human`, then the next `gpt`.
fn conversation(f: &Field) -> Option<(String, String)> {
    let turns: Vec<Turn> = match f {
        Field::Str(s) => serde_json::from_str(s).ok()?,
        Field::ListInternal(list) => list
            .elements()
            .iter()
            .filter_map(|e| match e {
                Field::Group(g) => Some(Turn {
                    from: get(g, "from").and_then(text)?,
                    value: get(g, "value").and_then(text)?,
                }),
                _ => None,
            })
            .collect(),
        _ => return None,
    };
    let q = turns.iter().position(|t| t.from == "human")?;
    let a = turns[q + 1..].iter().find(|t| t.from == "gpt")?;
    let question = turns[q].value.replace("<image>", "").trim().to_string();
    Some((question, a.value.trim().to_string()))
}

fn to_raw(row: &Row, map: &ColumnMap, root: &Path, id: String, doc_type: &str) -> Raw {
    let qa = match (&map.question, &map.answer, &map.conversations) {
        (Some(q), Some(a), _) => get(row, q).and_then(text).zip(get(row, a).and_then(text)),
        (_, _, Some(c)) => get(row, c).and_then(conversation),
        _ => None,
    };
    let Some((question, answer)) = qa else {
        return Raw::Rejected {
            reason: DropReason::EmptyText,
        };
    };
    let image = map
        .image
        .as_deref()
        .and_then(|c| get(row, c))
        .and_then(|f| image_bytes(f, root));
    let Some(image) = image else {
        return Raw::Rejected {
            reason: DropReason::DecodeError,
        };
    };
    Raw::Image {
        id,
        doc_type: doc_type.to_string(),
        image,
        prompt: question,
        target: answer.clone(),
        ground_truth: vec![Item::new("answer", &answer, "", "vqa")],
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Arc;

    use parquet::data_type::{ByteArray, ByteArrayType};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use parquet::schema::parser::parse_message_type;

    use super::*;

    /// A 64×64 PNG (above Qwen2-VL's 56×56 minimum).
    pub(crate) fn png() -> Vec<u8> {
        let img =
            image::RgbImage::from_fn(64, 64, |x, y| image::Rgb([x as u8 * 4, y as u8 * 4, 128]));
        let mut out = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
            .unwrap();
        out
    }

    /// Writes one row group; `columns[i]` is (values, definition levels) of leaf `i`.
    fn write(path: &Path, schema: &str, columns: Vec<(Vec<ByteArray>, Option<Vec<i16>>)>) {
        let schema = Arc::new(parse_message_type(schema).unwrap());
        let props = Arc::new(WriterProperties::builder().build());
        let mut w =
            SerializedFileWriter::new(std::fs::File::create(path).unwrap(), schema, props).unwrap();
        let mut rg = w.next_row_group().unwrap();
        let mut cols = columns.into_iter();
        while let Some(mut col) = rg.next_column().unwrap() {
            let (values, defs) = cols.next().expect("a column per leaf");
            col.typed::<ByteArrayType>()
                .write_batch(&values, defs.as_deref(), None)
                .unwrap();
            col.close().unwrap();
        }
        rg.close().unwrap();
        w.close().unwrap();
    }

    const PATHVQA: &str = "message schema { REQUIRED GROUP image { OPTIONAL BINARY bytes; OPTIONAL BINARY path (UTF8); } REQUIRED BINARY question (UTF8); REQUIRED BINARY answer (UTF8); }";

    fn ba(s: &[u8]) -> ByteArray {
        ByteArray::from(s.to_vec())
    }

    /// A PathVQA-layout file with two good rows and one with corrupt image bytes.
    pub(crate) fn write_pathvqa(path: &Path) {
        let good = png();
        write(
            path,
            PATHVQA,
            vec![
                (
                    vec![ba(&good), ba(b"\x89PNG corrupt"), ba(&good)],
                    Some(vec![1, 1, 1]),
                ),
                (vec![], Some(vec![0, 0, 0])),
                (
                    vec![
                        ba(b"what organ is shown?"),
                        ba(b"is this benign?"),
                        ba(b"is there necrosis?"),
                    ],
                    None,
                ),
                (vec![ba(b"liver"), ba(b"yes"), ba(b"no")], None),
            ],
        );
    }

    #[test]
    fn pathvqa_rows_yield_inline_images_questions_and_answers() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("train-00000.parquet");
        write_pathvqa(&p);
        let map = ColumnMap::default().resolve(Some(Preset::Pathvqa));
        let raws: Vec<Raw> = open(&p, &map, None, "vqa")
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(raws.len(), 3);
        let Raw::Image {
            id,
            image,
            prompt,
            target,
            ..
        } = &raws[0]
        else {
            panic!("{:?}", raws[0])
        };
        assert_eq!(id, "train-00000-000000");
        assert_eq!(image, &png());
        assert_eq!(
            (prompt.as_str(), target.as_str()),
            ("what organ is shown?", "liver")
        );
    }

    #[test]
    fn a_missing_mapped_column_lists_expected_and_found_columns() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.parquet");
        write(
            &p,
            "message schema { REQUIRED BINARY img; REQUIRED BINARY question (UTF8); REQUIRED BINARY answer (UTF8); }",
            vec![(vec![ba(&png())], None), (vec![ba(b"q")], None), (vec![ba(b"a")], None)],
        );
        let map = ColumnMap::default().resolve(Some(Preset::Pathvqa));
        let err = open(&p, &map, None, "vqa").err().unwrap().to_string();
        assert!(err.contains("x.parquet"), "{err}");
        assert!(
            err.contains("expected columns [\"image\", \"question\", \"answer\"]"),
            "{err}"
        );
        assert!(
            err.contains("found [\"img\", \"question\", \"answer\"]"),
            "{err}"
        );
    }

    #[test]
    fn pubmedvision_rows_read_image_paths_and_conversation_turns() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("images")).unwrap();
        std::fs::write(dir.path().join("images/a.png"), png()).unwrap();
        let p = dir.path().join("pmv.parquet");
        let conv = r#"[{"from":"human","value":"<image>\nDescribe the scan."},{"from":"gpt","value":"Axial CT with a 2 cm lesion."}]"#;
        write(
            &p,
            "message schema { REQUIRED BINARY image (UTF8); REQUIRED BINARY conversations (UTF8); }",
            vec![(vec![ba(b"images/a.png")], None), (vec![ba(conv.as_bytes())], None)],
        );
        let map = ColumnMap::default().resolve(Some(Preset::Pubmedvision));
        let raws: Vec<Raw> = open(&p, &map, None, "vqa")
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let Raw::Image {
            prompt,
            target,
            image,
            ..
        } = &raws[0]
        else {
            panic!("{:?}", raws[0])
        };
        assert_eq!(prompt, "Describe the scan.");
        assert_eq!(target, "Axial CT with a 2 cm lesion.");
        assert_eq!(image, &png());
    }

    #[test]
    fn a_mapping_without_answers_is_rejected() {
        let err = open(
            Path::new("x.parquet"),
            &ColumnMap {
                image: Some("i".into()),
                ..ColumnMap::default()
            },
            None,
            "vqa",
        )
        .err()
        .unwrap();
        assert!(err.to_string().contains("column mapping needs"), "{err}");
    }
}
