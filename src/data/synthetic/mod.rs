//! Seeded generator of clinical documents with exact ground truth.
//!
//! Eight document types (medication reconciliation, ICU flowsheet, cardiology consult, lab
//! panel, operative note, discharge summary, radiology report, pathology report), each drawn
//! in three layouts (ruled table, two-column form, free-text note). Vocabularies carry real
//! units and adult reference ranges (as printed on common US lab reports); about a third of
//! lab and vital values fall outside the range and are flagged `H`/`L` on the page.
//!
//! Document `i` of seed `s` depends only on `(s, i)`, so documents can be generated in any
//! order, in parallel, or regenerated after a crash, and come out identical.
//!
//! `doc_types` decides what each document type says; `facts` draws each value and words it
//! three ways (table row, form field, sentence); this module picks the layout and assembles
//! the blocks.

mod doc_types;
mod facts;

use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::document::{Block, DocType, Document, Layout};
use super::sample::target_json;
use super::vocab::{CLINICIANS, FIRST, LAST};
use doc_types::{build, Spec};

/// The synthetic source's name in sample rows.
pub const SOURCE: &str = "synthetic";

/// The rng of document `index` under `seed` (SplitMix64-style mixing keeps neighbours apart).
fn doc_rng(seed: u64, index: u64) -> ChaCha8Rng {
    let mut z = seed ^ index.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ChaCha8Rng::seed_from_u64(z ^ (z >> 31))
}

/// Document `index` of the stream for `seed`: its type cycles through [`DocType::ALL`] so
/// every type is equally represented; layout and content come from the seeded rng.
pub fn document(seed: u64, index: u64) -> Document {
    let mut rng = doc_rng(seed, index);
    let doc_type = DocType::ALL[(index % DocType::ALL.len() as u64) as usize];
    let layout = *[Layout::Table, Layout::Form, Layout::Note]
        .choose(&mut rng)
        .expect("the layout list is not empty");
    let spec = build(doc_type, &mut rng);
    assemble(format!("syn-{index:06}"), doc_type, layout, spec, &mut rng)
}

/// The first `n` documents of the stream for `seed`.
pub fn documents(seed: u64, n: usize) -> impl Iterator<Item = Document> {
    (0..n as u64).map(move |i| document(seed, i))
}

/// Plain clinical text for tokenizer training: each string is one synthetic document's text
/// followed by a line with its extraction target JSON (so the tokenizer also learns the
/// answer format the model must produce).
pub fn corpus(seed: u64, n: usize) -> impl Iterator<Item = String> {
    documents(seed, n).map(|d| format!("{}\n{}", d.plain_text(), target_json(&d.ground_truth)))
}

fn assemble(
    id: String,
    doc_type: DocType,
    layout: Layout,
    spec: Spec,
    rng: &mut ChaCha8Rng,
) -> Document {
    let patient = patient_fields(rng);
    let mut blocks = vec![Block::Fields {
        columns: 2,
        fields: patient,
    }];
    if !spec.intro.is_empty() {
        blocks.push(Block::Paragraph(spec.intro.clone()));
    }
    blocks.push(Block::Heading(spec.section.to_string()));
    match layout {
        Layout::Table => blocks.push(Block::Table {
            header: spec.header.iter().map(|h| h.to_string()).collect(),
            rows: spec.facts.iter().map(|f| f.row.clone()).collect(),
        }),
        Layout::Form => blocks.push(Block::Fields {
            columns: if rng.random_bool(0.5) { 2 } else { 1 },
            fields: spec
                .facts
                .iter()
                .map(|f| (f.item.term.clone(), f.field.clone()))
                .collect(),
        }),
        Layout::Note => blocks.push(Block::Paragraph(
            spec.facts
                .iter()
                .map(|f| f.sentence.as_str())
                .collect::<Vec<_>>()
                .join(" "),
        )),
    }
    if !spec.outro.is_empty() {
        blocks.push(Block::Heading(
            (*["Assessment", "Impression", "Plan"]
                .choose(rng)
                .expect("not empty"))
            .into(),
        ));
        blocks.push(Block::Paragraph(spec.outro.clone()));
    }
    Document {
        id,
        doc_type: doc_type.as_str().into(),
        title: spec.title.into(),
        blocks,
        ground_truth: spec.facts.into_iter().map(|f| f.item).collect(),
    }
}

/// Name, MRN, DOB, date and author: distractors that are never ground truth.
fn patient_fields(rng: &mut ChaCha8Rng) -> Vec<(String, String)> {
    let name = format!(
        "{} {}",
        FIRST.choose(rng).expect("not empty"),
        LAST.choose(rng).expect("not empty")
    );
    vec![
        ("Patient".into(), name),
        (
            "MRN".into(),
            format!("{:08}", rng.random_range(0..100_000_000u32)),
        ),
        ("DOB".into(), date(rng, 1930, 2004)),
        ("Date".into(), date(rng, 2022, 2026)),
        (
            "Clinician".into(),
            CLINICIANS.choose(rng).expect("not empty").to_string(),
        ),
    ]
}

fn date(rng: &mut ChaCha8Rng, from_year: u32, to_year: u32) -> String {
    format!(
        "{}-{:02}-{:02}",
        rng.random_range(from_year..=to_year),
        rng.random_range(1..=12u32),
        rng.random_range(1..=28u32)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_and_index_give_the_same_document() {
        assert_eq!(document(7, 123), document(7, 123));
        assert_ne!(document(7, 123), document(8, 123));
    }

    #[test]
    fn all_eight_types_and_three_layouts_appear() {
        let docs: Vec<Document> = documents(1, 96).collect();
        let types: std::collections::BTreeSet<_> =
            docs.iter().map(|d| d.doc_type.clone()).collect();
        assert_eq!(types.len(), 8, "{types:?}");
        let has = |pred: fn(&Block) -> bool| docs.iter().any(|d| d.blocks.iter().skip(1).any(pred));
        assert!(has(|b| matches!(b, Block::Table { .. })));
        assert!(has(|b| matches!(b, Block::Fields { .. })));
        assert!(has(|b| matches!(b, Block::Paragraph(p) if p.len() > 80)));
    }

    #[test]
    fn every_ground_truth_value_and_term_is_printed_on_the_page() {
        for doc in documents(3, 200) {
            let text = doc.plain_text();
            assert!(!doc.ground_truth.is_empty(), "{}", doc.id);
            for item in &doc.ground_truth {
                assert!(
                    text.contains(&item.term),
                    "{}: term {:?} missing",
                    doc.id,
                    item.term
                );
                assert!(
                    text.contains(&item.value),
                    "{}: value {:?} missing",
                    doc.id,
                    item.value
                );
                assert!(
                    text.contains(&item.unit),
                    "{}: unit {:?} missing",
                    doc.id,
                    item.unit
                );
            }
        }
    }

    #[test]
    fn lab_values_include_out_of_range_values_with_flags() {
        let flagged = documents(5, 400)
            .filter(|d| d.doc_type == "lab_panel")
            .flat_map(|d| d.blocks)
            .filter_map(|b| match b {
                Block::Table { rows, .. } => Some(rows),
                _ => None,
            })
            .flatten()
            .filter(|r| r[4] == "H" || r[4] == "L")
            .count();
        assert!(flagged > 10, "only {flagged} flagged lab rows");
    }

    #[test]
    fn ground_truth_terms_are_unique_within_a_document() {
        for doc in documents(11, 300) {
            let mut terms: Vec<_> = doc.ground_truth.iter().map(|i| &i.term).collect();
            let n = terms.len();
            terms.sort();
            terms.dedup();
            assert_eq!(terms.len(), n, "{}: repeated term", doc.id);
        }
    }

    #[test]
    fn corpus_yields_text_with_the_target_line() {
        let texts: Vec<String> = corpus(2, 5).collect();
        assert_eq!(texts.len(), 5);
        assert!(texts.iter().all(|t| t.contains("\"term\":")));
    }
}
