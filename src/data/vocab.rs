//! Vocabularies of the synthetic generator: labs with units and adult reference ranges (as
//! printed on common US laboratory reports), vital signs, echo/ECG measurements, scores,
//! drugs with their usual doses, routes and frequencies, ICU infusions, and names.

pub(crate) const FIRST: &[&str] = &[
    "Maria", "James", "Aisha", "Wei", "Olga", "Carlos", "Fatima", "John", "Priya", "Lars", "Grace",
    "Ahmed", "Elena", "Tomas", "Yuki", "Samuel", "Ingrid", "Kofi", "Rosa", "Daniel",
];
pub(crate) const LAST: &[&str] = &[
    "Garcia", "Smith", "Khan", "Chen", "Petrova", "Silva", "Haddad", "Miller", "Patel", "Nilsson",
    "Okafor", "Rossi", "Novak", "Tanaka", "Brown", "Schmidt", "Mensah", "Lopez",
];
pub(crate) const CLINICIANS: &[&str] = &[
    "Dr. A. Moreau",
    "Dr. K. Osei",
    "Dr. L. Berg",
    "Dr. S. Iyer",
    "Dr. R. Alvarez",
    "Dr. M. Weiss",
];

/// A numeric quantity with an adult reference range.
pub(crate) struct Quantity {
    pub(crate) term: &'static str,
    pub(crate) unit: &'static str,
    pub(crate) low: f64,
    pub(crate) high: f64,
    pub(crate) decimals: usize,
}

const fn q(
    term: &'static str,
    unit: &'static str,
    low: f64,
    high: f64,
    decimals: usize,
) -> Quantity {
    Quantity {
        term,
        unit,
        low,
        high,
        decimals,
    }
}

pub(crate) const LABS: &[Quantity] = &[
    q("Sodium", "mmol/L", 135.0, 145.0, 0),
    q("Potassium", "mmol/L", 3.5, 5.1, 1),
    q("Chloride", "mmol/L", 98.0, 107.0, 0),
    q("Bicarbonate", "mmol/L", 22.0, 29.0, 0),
    q("BUN", "mg/dL", 7.0, 20.0, 0),
    q("Creatinine", "mg/dL", 0.6, 1.3, 2),
    q("Glucose", "mg/dL", 70.0, 99.0, 0),
    q("Calcium", "mg/dL", 8.5, 10.5, 1),
    q("Magnesium", "mg/dL", 1.7, 2.2, 1),
    q("Phosphate", "mg/dL", 2.5, 4.5, 1),
    q("WBC", "10^3/uL", 4.0, 11.0, 1),
    q("Hemoglobin", "g/dL", 12.0, 17.5, 1),
    q("Hematocrit", "%", 36.0, 50.0, 1),
    q("Platelets", "10^3/uL", 150.0, 400.0, 0),
    q("MCV", "fL", 80.0, 100.0, 0),
    q("ALT", "U/L", 7.0, 56.0, 0),
    q("AST", "U/L", 10.0, 40.0, 0),
    q("Alkaline phosphatase", "U/L", 44.0, 147.0, 0),
    q("Total bilirubin", "mg/dL", 0.1, 1.2, 1),
    q("Albumin", "g/dL", 3.5, 5.0, 1),
    q("Troponin I", "ng/mL", 0.0, 0.04, 2),
    q("BNP", "pg/mL", 0.0, 100.0, 0),
    q("LDL cholesterol", "mg/dL", 0.0, 100.0, 0),
    q("HDL cholesterol", "mg/dL", 40.0, 60.0, 0),
    q("Triglycerides", "mg/dL", 0.0, 150.0, 0),
    q("INR", "", 0.8, 1.2, 1),
    q("PT", "s", 11.0, 13.5, 1),
    q("aPTT", "s", 25.0, 35.0, 0),
    q("Lactate", "mmol/L", 0.5, 2.2, 1),
    q("TSH", "mIU/L", 0.4, 4.0, 2),
    q("HbA1c", "%", 4.0, 5.6, 1),
    q("CRP", "mg/L", 0.0, 10.0, 1),
    q("Procalcitonin", "ng/mL", 0.0, 0.5, 2),
    q("Ferritin", "ng/mL", 24.0, 336.0, 0),
];

pub(crate) const VITALS: &[Quantity] = &[
    q("Heart rate", "bpm", 60.0, 100.0, 0),
    q("Respiratory rate", "breaths/min", 12.0, 20.0, 0),
    q("Temperature", "°C", 36.1, 37.8, 1),
    q("SpO2", "%", 94.0, 100.0, 0),
    q("MAP", "mmHg", 65.0, 105.0, 0),
    q("CVP", "mmHg", 2.0, 8.0, 0),
    q("Urine output", "mL/h", 30.0, 150.0, 0),
    q("FiO2", "%", 21.0, 60.0, 0),
    q("PEEP", "cmH2O", 5.0, 12.0, 0),
    q("Weight", "kg", 50.0, 120.0, 1),
];

pub(crate) const ECHO: &[Quantity] = &[
    q("LVEF", "%", 55.0, 70.0, 0),
    q("LV end-diastolic diameter", "mm", 42.0, 58.0, 0),
    q("QTc", "ms", 350.0, 450.0, 0),
    q("PR interval", "ms", 120.0, 200.0, 0),
    q("QRS duration", "ms", 80.0, 120.0, 0),
    q("LA volume index", "mL/m2", 16.0, 34.0, 0),
    q("TAPSE", "mm", 17.0, 28.0, 0),
    q("RVSP", "mmHg", 15.0, 35.0, 0),
];

pub(crate) const SCORES: &[(&str, i32, i32)] = &[
    ("GCS", 3, 15),
    ("RASS", -5, 4),
    ("Pain score", 0, 10),
    ("SOFA", 0, 20),
    ("APACHE II", 0, 40),
    ("Braden scale", 6, 23),
];

/// A drug with its usual doses, unit, routes and frequencies.
pub(crate) struct Drug {
    pub(crate) name: &'static str,
    pub(crate) doses: &'static [&'static str],
    pub(crate) unit: &'static str,
    pub(crate) routes: &'static [&'static str],
    pub(crate) freqs: &'static [&'static str],
}

const fn d(
    name: &'static str,
    doses: &'static [&'static str],
    unit: &'static str,
    routes: &'static [&'static str],
    freqs: &'static [&'static str],
) -> Drug {
    Drug {
        name,
        doses,
        unit,
        routes,
        freqs,
    }
}

pub(crate) const DRUGS: &[Drug] = &[
    d(
        "Metoprolol tartrate",
        &["12.5", "25", "50", "100"],
        "mg",
        &["PO"],
        &["BID"],
    ),
    d(
        "Lisinopril",
        &["2.5", "5", "10", "20", "40"],
        "mg",
        &["PO"],
        &["daily"],
    ),
    d(
        "Atorvastatin",
        &["10", "20", "40", "80"],
        "mg",
        &["PO"],
        &["nightly"],
    ),
    d(
        "Metformin",
        &["500", "850", "1000"],
        "mg",
        &["PO"],
        &["BID"],
    ),
    d(
        "Furosemide",
        &["20", "40", "80"],
        "mg",
        &["PO", "IV"],
        &["daily", "BID"],
    ),
    d("Apixaban", &["2.5", "5"], "mg", &["PO"], &["BID"]),
    d("Aspirin", &["81", "325"], "mg", &["PO"], &["daily"]),
    d("Clopidogrel", &["75"], "mg", &["PO"], &["daily"]),
    d(
        "Insulin glargine",
        &["10", "14", "20", "24", "30"],
        "units",
        &["SC"],
        &["nightly"],
    ),
    d(
        "Insulin lispro",
        &["2", "4", "6", "8"],
        "units",
        &["SC"],
        &["TID with meals"],
    ),
    d("Heparin", &["5000"], "units", &["SC"], &["q8h"]),
    d(
        "Enoxaparin",
        &["40", "60", "80"],
        "mg",
        &["SC"],
        &["daily", "q12h"],
    ),
    d("Pantoprazole", &["40"], "mg", &["PO", "IV"], &["daily"]),
    d("Amlodipine", &["2.5", "5", "10"], "mg", &["PO"], &["daily"]),
    d(
        "Levothyroxine",
        &["25", "50", "75", "100", "125"],
        "mcg",
        &["PO"],
        &["daily"],
    ),
    d("Ceftriaxone", &["1", "2"], "g", &["IV"], &["daily"]),
    d(
        "Vancomycin",
        &["750", "1000", "1250", "1500"],
        "mg",
        &["IV"],
        &["q12h"],
    ),
    d(
        "Piperacillin-tazobactam",
        &["3.375", "4.5"],
        "g",
        &["IV"],
        &["q6h", "q8h"],
    ),
    d(
        "Acetaminophen",
        &["500", "650", "1000"],
        "mg",
        &["PO"],
        &["q6h PRN"],
    ),
    d("Oxycodone", &["5", "10"], "mg", &["PO"], &["q4h PRN"]),
    d("Ondansetron", &["4"], "mg", &["IV", "PO"], &["q8h PRN"]),
    d(
        "Potassium chloride",
        &["10", "20", "40"],
        "mEq",
        &["PO"],
        &["daily"],
    ),
    d(
        "Prednisone",
        &["5", "10", "20", "40"],
        "mg",
        &["PO"],
        &["daily"],
    ),
    d("Amiodarone", &["200", "400"], "mg", &["PO"], &["daily"]),
    d(
        "Warfarin",
        &["1", "2", "2.5", "5"],
        "mg",
        &["PO"],
        &["daily"],
    ),
    d("Spironolactone", &["25", "50"], "mg", &["PO"], &["daily"]),
    d(
        "Carvedilol",
        &["3.125", "6.25", "12.5", "25"],
        "mg",
        &["PO"],
        &["BID"],
    ),
];

pub(crate) const INFUSIONS: &[Quantity] = &[
    q("Norepinephrine", "mcg/kg/min", 0.02, 0.5, 2),
    q("Propofol", "mcg/kg/min", 5.0, 50.0, 0),
    q("Fentanyl", "mcg/h", 25.0, 200.0, 0),
    q("Dexmedetomidine", "mcg/kg/h", 0.2, 1.4, 1),
    q("Insulin infusion", "units/h", 1.0, 12.0, 1),
    q("Vasopressin", "units/min", 0.03, 0.04, 2),
];
