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

use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::document::{Block, DocType, Document, Item, Layout};
use super::sample::target_json;
use super::vocab::{
    Drug, Quantity, CLINICIANS, DRUGS, ECHO, FIRST, INFUSIONS, LABS, LAST, SCORES, VITALS,
};

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

/// One fact on the page: the ground-truth item and how each layout shows it.
struct Fact {
    item: Item,
    /// Cells of the document's table row.
    row: Vec<String>,
    /// Value text of the form field (`138 mmol/L  H`).
    field: String,
    /// A sentence stating the fact, for the note layout.
    sentence: String,
}

/// What a document type contributes before layout.
struct Spec {
    title: &'static str,
    /// Heading over the facts.
    section: &'static str,
    /// Table header for the facts.
    header: Vec<&'static str>,
    facts: Vec<Fact>,
    /// Prose before the facts (history, indication); never holds ground truth.
    intro: String,
    /// Prose after the facts (impression, plan); never holds ground truth.
    outro: String,
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

/// Draws `n` distinct entries of `pool`, in pool order (reports list tests in a fixed order).
fn pick<'a, T>(rng: &mut ChaCha8Rng, pool: &'a [T], n: usize) -> Vec<&'a T> {
    let mut idx = rand::seq::index::sample(rng, pool.len(), n.min(pool.len())).into_vec();
    idx.sort_unstable();
    idx.into_iter().map(|i| &pool[i]).collect()
}

/// A value for `q`: about 70 % inside the reference range, the rest above or below it.
/// Returns the printed value and its flag (`H`, `L` or empty).
fn sample_value(rng: &mut ChaCha8Rng, q: &Quantity) -> (String, &'static str) {
    let width = q.high - q.low;
    let r: f64 = rng.random();
    let v = if r < 0.7 {
        rng.random_range(q.low..=q.high)
    } else if r < 0.85 || q.low <= 0.0 {
        rng.random_range(q.high..=q.high + width * 0.8)
    } else {
        rng.random_range((q.low - width * 0.5).max(q.low * 0.4)..=q.low)
    };
    let text = format!("{:.*}", q.decimals, v);
    let shown: f64 = text.parse().unwrap_or(v);
    let flag = if shown > q.high {
        "H"
    } else if shown < q.low {
        "L"
    } else {
        ""
    };
    (text, flag)
}

fn range_text(q: &Quantity) -> String {
    format!("{:.*}-{:.*}", q.decimals, q.low, q.decimals, q.high)
}

fn with_unit(value: &str, unit: &str) -> String {
    if unit.is_empty() {
        value.to_string()
    } else if unit == "%" {
        format!("{value}%")
    } else {
        format!("{value} {unit}")
    }
}

/// A measured quantity (lab, vital, echo) as a fact with flag and reference range.
fn quantity_fact(rng: &mut ChaCha8Rng, q: &Quantity, category: &str, table: QuantityTable) -> Fact {
    let (value, flag) = sample_value(rng, q);
    let shown = with_unit(&value, q.unit);
    let field = if flag.is_empty() {
        shown.clone()
    } else {
        format!("{shown}  {flag}")
    };
    let row = match table {
        QuantityTable::Lab => vec![
            q.term.into(),
            value.clone(),
            q.unit.into(),
            range_text(q),
            flag.into(),
        ],
        QuantityTable::Plain => vec![q.term.into(), value.clone(), q.unit.into()],
    };
    let sentence = match (flag, rng.random_range(0..3)) {
        ("H", _) => format!("{} was elevated at {shown}.", q.term),
        ("L", _) => format!("{} was low at {shown}.", q.term),
        (_, 0) => format!("{} {shown}.", q.term),
        (_, 1) => format!("{} was {shown}.", q.term),
        _ => format!("{} measured {shown}.", q.term),
    };
    Fact {
        item: Item::new(q.term, &value, q.unit, category),
        row,
        field,
        sentence,
    }
}

#[derive(Clone, Copy)]
enum QuantityTable {
    /// Test | Result | Unit | Reference | Flag
    Lab,
    /// Parameter | Value | Unit
    Plain,
}

fn drug_fact(rng: &mut ChaCha8Rng, drug: &Drug) -> Fact {
    let dose = *drug.doses.choose(rng).expect("every drug has a dose");
    let route = *drug.routes.choose(rng).expect("every drug has a route");
    let freq = *drug.freqs.choose(rng).expect("every drug has a frequency");
    let sentence = match rng.random_range(0..3) {
        0 => format!("{} {dose} {} {route} {freq}.", drug.name, drug.unit),
        1 => format!(
            "Continue {} {dose} {} {route} {freq}.",
            drug.name, drug.unit
        ),
        _ => format!("Takes {} {dose} {} {route} {freq}.", drug.name, drug.unit),
    };
    Fact {
        item: Item::new(drug.name, dose, drug.unit, "medication"),
        row: vec![
            drug.name.into(),
            format!("{dose} {}", drug.unit),
            route.into(),
            freq.into(),
        ],
        field: format!("{dose} {} {route} {freq}", drug.unit),
        sentence,
    }
}

fn infusion_fact(rng: &mut ChaCha8Rng, q: &Quantity) -> Fact {
    let v = rng.random_range(q.low..=q.high);
    let value = format!("{:.*}", q.decimals, v);
    Fact {
        item: Item::new(q.term, &value, q.unit, "medication"),
        row: vec![q.term.into(), value.clone(), q.unit.into()],
        field: format!("{value} {}", q.unit),
        sentence: format!("{} infusing at {value} {}.", q.term, q.unit),
    }
}

fn score_fact(rng: &mut ChaCha8Rng, (term, lo, hi): (&'static str, i32, i32)) -> Fact {
    let value = rng.random_range(lo..=hi).to_string();
    Fact {
        item: Item::new(term, &value, "", "score"),
        row: vec![term.into(), value.clone(), String::new()],
        field: value.clone(),
        sentence: format!("{term} {value}."),
    }
}

fn blood_pressure_fact(rng: &mut ChaCha8Rng) -> Fact {
    let sys: u32 = if rng.random_bool(0.3) {
        rng.random_range(141..=190)
    } else {
        rng.random_range(95..=140)
    };
    let dia: u32 = rng.random_range(50..=(sys * 2 / 3).max(51));
    let value = format!("{sys}/{dia}");
    let flag = if sys > 140 { "H" } else { "" };
    Fact {
        item: Item::new("Blood pressure", &value, "mmHg", "vital"),
        row: vec!["Blood pressure".into(), value.clone(), "mmHg".into()],
        field: if flag.is_empty() {
            format!("{value} mmHg")
        } else {
            format!("{value} mmHg  H")
        },
        sentence: format!("Blood pressure {value} mmHg."),
    }
}

/// A measurement with free range (radiology, pathology, operative figures).
fn measure_fact(
    rng: &mut ChaCha8Rng,
    term: &'static str,
    unit: &'static str,
    lo: f64,
    hi: f64,
    decimals: usize,
    category: &str,
) -> Fact {
    let value = format!("{:.*}", decimals, rng.random_range(lo..=hi));
    let shown = with_unit(&value, unit);
    Fact {
        item: Item::new(term, &value, unit, category),
        row: vec![term.into(), value.clone(), unit.into()],
        field: shown.clone(),
        sentence: format!("{term}: {shown}."),
    }
}

/// A categorical finding (`Pleural effusion: small`).
fn finding_fact(
    rng: &mut ChaCha8Rng,
    term: &'static str,
    values: &[&'static str],
    category: &str,
) -> Fact {
    let value = *values.choose(rng).expect("every finding has values");
    Fact {
        item: Item::new(term, value, "", category),
        row: vec![term.into(), value.into(), String::new()],
        field: value.into(),
        sentence: format!("{term}: {value}."),
    }
}

fn prose(rng: &mut ChaCha8Rng, options: &[&str]) -> String {
    options
        .choose(rng)
        .expect("prose options are not empty")
        .to_string()
}

const PLAIN_HEADER: [&str; 3] = ["Parameter", "Value", "Unit"];

fn build(t: DocType, rng: &mut ChaCha8Rng) -> Spec {
    match t {
        DocType::MedicationReconciliation => {
            let n = rng.random_range(4..=7);
            let facts = pick(rng, DRUGS, n)
                .into_iter()
                .map(|dr| drug_fact(rng, dr))
                .collect();
            Spec {
                title: "Medication Reconciliation",
                section: "Current Medications",
                header: vec!["Medication", "Dose", "Route", "Frequency"],
                facts,
                intro: prose(
                    rng,
                    &[
                        "Reconciled on admission with the patient and the pharmacy list.",
                        "Home medication list reviewed with patient and caregiver.",
                        "Medications verified against outpatient records at transfer.",
                    ],
                ),
                outro: prose(
                    rng,
                    &[
                        "No known drug allergies. No changes to home regimen.",
                        "Allergy: penicillin (rash). Hold metformin before contrast.",
                        "Patient counselled on anticoagulation and bleeding precautions.",
                    ],
                ),
            }
        }
        DocType::IcuFlowsheet => {
            let mut facts: Vec<Fact> = Vec::new();
            facts.push(blood_pressure_fact(rng));
            let n = rng.random_range(3..=5);
            for v in pick(rng, VITALS, n) {
                facts.push(quantity_fact(rng, v, "vital", QuantityTable::Plain));
            }
            for s in pick(rng, SCORES, 1) {
                let mut f = score_fact(rng, *s);
                f.item.category = "score".into();
                facts.push(f);
            }
            let k = rng.random_range(1..=2);
            for inf in pick(rng, INFUSIONS, k) {
                facts.push(infusion_fact(rng, inf));
            }
            Spec {
                title: "ICU Flowsheet",
                section: [
                    "Vitals and Drips 08:00",
                    "Hourly Assessment 14:00",
                    "Nursing Flowsheet 22:00",
                ][rng.random_range(0..3)],
                header: PLAIN_HEADER.to_vec(),
                facts,
                intro: prose(
                    rng,
                    &[
                        "Intubated, sedated. Day 3 of septic shock.",
                        "Post-operative day 1 after CABG, on low-dose pressor.",
                        "Admitted for respiratory failure; on ventilator.",
                    ],
                ),
                outro: String::new(),
            }
        }
        DocType::CardiologyConsult => {
            let mut facts = vec![blood_pressure_fact(rng)];
            let n = rng.random_range(2..=4);
            for e in pick(rng, ECHO, n) {
                facts.push(quantity_fact(rng, e, "measurement", QuantityTable::Plain));
            }
            let k = rng.random_range(1..=2);
            for l in pick(rng, &LABS[20..25], k) {
                facts.push(quantity_fact(rng, l, "lab", QuantityTable::Plain));
            }
            facts.push(score_fact(rng, ("CHA2DS2-VASc", 0, 9)));
            Spec {
                title: "Cardiology Consultation",
                section: "Findings",
                header: PLAIN_HEADER.to_vec(),
                facts,
                intro: prose(
                    rng,
                    &[
                        "Consulted for new atrial fibrillation with rapid ventricular response.",
                        "Asked to evaluate chest pain and an abnormal ECG.",
                        "Referred for dyspnea on exertion and lower-extremity edema.",
                    ],
                ),
                outro: prose(
                    rng,
                    &[
                        "Rate control, start anticoagulation, repeat echo in 3 months.",
                        "Serial troponins; cardiac catheterization if rising.",
                        "Diuresis, optimize guideline-directed therapy, follow up in clinic.",
                    ],
                ),
            }
        }
        DocType::LabPanel => {
            let panels: [(&str, std::ops::Range<usize>); 4] = [
                ("Basic Metabolic Panel", 0..10),
                ("Complete Blood Count", 10..15),
                ("Hepatic Function Panel", 15..20),
                ("Coagulation and Inflammation", 25..34),
            ];
            let (name, range) = panels.choose(rng).expect("not empty").clone();
            let pool = &LABS[range];
            let n = rng.random_range(4..=pool.len().min(8));
            let facts = pick(rng, pool, n)
                .into_iter()
                .map(|l| quantity_fact(rng, l, "lab", QuantityTable::Lab))
                .collect();
            Spec {
                title: "Laboratory Report",
                section: name,
                header: vec!["Test", "Result", "Unit", "Reference", "Flag"],
                facts,
                intro: prose(
                    rng,
                    &[
                        "Specimen: venous blood, collected 06:10, received 06:45.",
                        "Specimen: serum. Fasting sample.",
                        "Specimen: whole blood, EDTA. Collected at bedside.",
                    ],
                ),
                outro: String::new(),
            }
        }
        DocType::OperativeNote => {
            let mut facts = vec![
                measure_fact(
                    rng,
                    "Estimated blood loss",
                    "mL",
                    10.0,
                    1200.0,
                    0,
                    "procedure",
                ),
                measure_fact(rng, "Operative time", "min", 35.0, 360.0, 0, "procedure"),
                measure_fact(rng, "Crystalloid", "mL", 500.0, 4000.0, 0, "procedure"),
            ];
            if rng.random_bool(0.5) {
                facts.push(measure_fact(
                    rng,
                    "Urine output",
                    "mL",
                    50.0,
                    1200.0,
                    0,
                    "procedure",
                ));
            }
            facts.push(finding_fact(
                rng,
                "ASA class",
                &["I", "II", "III", "IV"],
                "score",
            ));
            let cef = Drug {
                name: "Cefazolin",
                doses: &["1", "2", "3"],
                unit: "g",
                routes: &["IV"],
                freqs: &["once"],
            };
            facts.push(drug_fact(rng, &cef));
            Spec {
                title: "Operative Note",
                section: "Intraoperative Data",
                header: PLAIN_HEADER.to_vec(),
                facts,
                intro: format!(
                    "Procedure: {}. Anesthesia: {}.",
                    prose(rng, &["Laparoscopic cholecystectomy", "Total knee arthroplasty", "Open appendectomy", "Right hemicolectomy", "Hip hemiarthroplasty"]),
                    prose(rng, &["general endotracheal", "spinal", "general with nerve block"])
                ),
                outro: prose(rng, &[
                    "No complications. Patient extubated and taken to PACU in stable condition.",
                    "Specimen sent to pathology. Counts correct x2.",
                    "Drain placed. Transferred to recovery in good condition.",
                ]),
            }
        }
        DocType::DischargeSummary => {
            let mut facts = vec![measure_fact(
                rng,
                "Length of stay",
                "days",
                1.0,
                21.0,
                0,
                "measurement",
            )];
            let k = rng.random_range(2..=4);
            for dr in pick(rng, DRUGS, k) {
                facts.push(drug_fact(rng, dr));
            }
            for l in pick(rng, LABS, 2) {
                facts.push(quantity_fact(rng, l, "lab", QuantityTable::Plain));
            }
            facts.push(blood_pressure_fact(rng));
            Spec {
                title: "Discharge Summary",
                section: "Discharge Data",
                header: PLAIN_HEADER.to_vec(),
                facts,
                intro: prose(
                    rng,
                    &[
                        "Admitted with community-acquired pneumonia, treated and improved.",
                        "Admitted with decompensated heart failure; diuresed well.",
                        "Admitted with diabetic ketoacidosis, resolved on insulin drip.",
                    ],
                ),
                outro: prose(
                    rng,
                    &[
                        "Follow up with primary care in 1 week. Return if fever or dyspnea.",
                        "Repeat labs in 3 days. Cardiology clinic in 2 weeks.",
                        "Home with visiting nurse. Diabetes education completed.",
                    ],
                ),
            }
        }
        DocType::RadiologyReport => {
            let mut facts = Vec::new();
            let pool: [(&str, &str, f64, f64, usize); 8] = [
                ("Pulmonary nodule", "mm", 3.0, 28.0, 0),
                ("Abdominal aorta diameter", "cm", 1.8, 5.5, 1),
                ("Liver span", "cm", 11.0, 20.0, 1),
                ("Common bile duct", "mm", 3.0, 12.0, 0),
                ("Right kidney length", "cm", 9.0, 13.0, 1),
                ("Spleen length", "cm", 8.0, 16.0, 1),
                ("Midline shift", "mm", 0.0, 10.0, 0),
                ("Thyroid nodule", "mm", 4.0, 35.0, 0),
            ];
            let k = rng.random_range(2..=4);
            for (term, unit, lo, hi, dec) in pick(rng, &pool, k) {
                facts.push(measure_fact(rng, term, unit, *lo, *hi, *dec, "measurement"));
            }
            facts.push(finding_fact(
                rng,
                "Pleural effusion",
                &["none", "small", "moderate", "large"],
                "finding",
            ));
            if rng.random_bool(0.5) {
                facts.push(measure_fact(
                    rng,
                    "Contrast volume",
                    "mL",
                    50.0,
                    120.0,
                    0,
                    "procedure",
                ));
            }
            Spec {
                title: "Radiology Report",
                section: "Findings",
                header: vec!["Finding", "Value", "Unit"],
                facts,
                intro: format!(
                    "Exam: {}. Indication: {}.",
                    prose(
                        rng,
                        &[
                            "CT chest with contrast",
                            "CT abdomen and pelvis",
                            "Ultrasound abdomen",
                            "MRI brain without contrast"
                        ]
                    ),
                    prose(
                        rng,
                        &[
                            "shortness of breath",
                            "abdominal pain",
                            "follow-up of known nodule",
                            "headache and confusion"
                        ]
                    )
                ),
                outro: prose(
                    rng,
                    &[
                        "No acute abnormality. Recommend follow-up CT in 6 months.",
                        "Findings discussed with the ordering physician.",
                        "Compared with prior study, no significant interval change.",
                    ],
                ),
            }
        }
        DocType::PathologyReport => {
            let mut facts = vec![
                measure_fact(rng, "Tumor size", "cm", 0.4, 8.0, 1, "measurement"),
                measure_fact(rng, "Margin distance", "mm", 0.5, 15.0, 1, "measurement"),
            ];
            let nodes = rng.random_range(6..=24u32);
            let pos = rng.random_range(0..=nodes.min(6));
            facts.push(finding_fact(
                rng,
                "Histologic grade",
                &["1", "2", "3"],
                "finding",
            ));
            let ln = format!("{pos}/{nodes}");
            facts.push(Fact {
                item: Item::new("Lymph nodes positive", &ln, "", "finding"),
                row: vec!["Lymph nodes positive".into(), ln.clone(), String::new()],
                field: ln.clone(),
                sentence: format!("Lymph nodes positive: {ln}."),
            });
            if rng.random_bool(0.6) {
                facts.push(measure_fact(rng, "Ki-67", "%", 1.0, 80.0, 0, "measurement"));
            }
            if rng.random_bool(0.5) {
                facts.push(finding_fact(
                    rng,
                    "HER2",
                    &["0", "1+", "2+", "3+"],
                    "finding",
                ));
            }
            Spec {
                title: "Surgical Pathology Report",
                section: "Synoptic Report",
                header: vec!["Element", "Value", "Unit"],
                facts,
                intro: format!(
                    "Specimen: {}. Clinical history: {}.",
                    prose(
                        rng,
                        &[
                            "left breast, lumpectomy",
                            "sigmoid colon, resection",
                            "right lung upper lobe, lobectomy",
                            "prostate, radical prostatectomy"
                        ]
                    ),
                    prose(
                        rng,
                        &[
                            "mass on imaging",
                            "biopsy-proven carcinoma",
                            "screening abnormality"
                        ]
                    )
                ),
                outro: prose(
                    rng,
                    &[
                        "Invasive carcinoma. Margins negative. See synoptic report.",
                        "Adenocarcinoma, moderately differentiated. Margins free.",
                        "Findings reviewed at tumor board.",
                    ],
                ),
            }
        }
    }
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
