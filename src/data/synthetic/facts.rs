//! Facts: a ground-truth item drawn from the vocabularies (values inside or outside the
//! reference range, with their `H`/`L` flag) and how each layout prints it.

use rand::seq::IndexedRandom;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::data::document::Item;
use crate::data::vocab::{Drug, Quantity};

/// One fact on the page: the ground-truth item and how each layout shows it.
pub(super) struct Fact {
    pub(super) item: Item,
    /// Cells of the document's table row.
    pub(super) row: Vec<String>,
    /// Value text of the form field (`138 mmol/L  H`).
    pub(super) field: String,
    /// A sentence stating the fact, for the note layout.
    pub(super) sentence: String,
}

/// Draws `n` distinct entries of `pool`, in pool order (reports list tests in a fixed order).
pub(super) fn pick<'a, T>(rng: &mut ChaCha8Rng, pool: &'a [T], n: usize) -> Vec<&'a T> {
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
pub(super) fn quantity_fact(
    rng: &mut ChaCha8Rng,
    q: &Quantity,
    category: &str,
    table: QuantityTable,
) -> Fact {
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
pub(super) enum QuantityTable {
    /// Test | Result | Unit | Reference | Flag
    Lab,
    /// Parameter | Value | Unit
    Plain,
}

pub(super) fn drug_fact(rng: &mut ChaCha8Rng, drug: &Drug) -> Fact {
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

pub(super) fn infusion_fact(rng: &mut ChaCha8Rng, q: &Quantity) -> Fact {
    let v = rng.random_range(q.low..=q.high);
    let value = format!("{:.*}", q.decimals, v);
    Fact {
        item: Item::new(q.term, &value, q.unit, "medication"),
        row: vec![q.term.into(), value.clone(), q.unit.into()],
        field: format!("{value} {}", q.unit),
        sentence: format!("{} infusing at {value} {}.", q.term, q.unit),
    }
}

pub(super) fn score_fact(rng: &mut ChaCha8Rng, (term, lo, hi): (&'static str, i32, i32)) -> Fact {
    let value = rng.random_range(lo..=hi).to_string();
    Fact {
        item: Item::new(term, &value, "", "score"),
        row: vec![term.into(), value.clone(), String::new()],
        field: value.clone(),
        sentence: format!("{term} {value}."),
    }
}

pub(super) fn blood_pressure_fact(rng: &mut ChaCha8Rng) -> Fact {
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
pub(super) fn measure_fact(
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
pub(super) fn finding_fact(
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

pub(super) fn prose(rng: &mut ChaCha8Rng, options: &[&str]) -> String {
    options
        .choose(rng)
        .expect("prose options are not empty")
        .to_string()
}
