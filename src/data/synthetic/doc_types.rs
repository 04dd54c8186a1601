//! What each of the eight document types says: its title, section, table header, the facts
//! it draws from the vocabularies, and the prose around them.

use rand::seq::IndexedRandom;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::facts::{
    blood_pressure_fact, drug_fact, finding_fact, infusion_fact, measure_fact, pick, prose,
    quantity_fact, score_fact, Fact, QuantityTable,
};
use crate::data::document::{DocType, Item};
use crate::data::vocab::{Drug, DRUGS, ECHO, INFUSIONS, LABS, SCORES, VITALS};

/// What a document type contributes before layout.
pub(super) struct Spec {
    pub(super) title: &'static str,
    /// Heading over the facts.
    pub(super) section: &'static str,
    /// Table header for the facts.
    pub(super) header: Vec<&'static str>,
    pub(super) facts: Vec<Fact>,
    /// Prose before the facts (history, indication); never holds ground truth.
    pub(super) intro: String,
    /// Prose after the facts (impression, plan); never holds ground truth.
    pub(super) outro: String,
}

/// Table header of the types whose facts are plain measurements.
const PLAIN_HEADER: [&str; 3] = ["Parameter", "Value", "Unit"];

/// The content of a document of type `t`, drawn from `rng`.
pub(super) fn build(t: DocType, rng: &mut ChaCha8Rng) -> Spec {
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
