//! Renders synthetic pages and prints the rate; optionally writes them as PNG for a look.
//!
//! `cargo run --example render_pages -- [count] [out_dir]`; `ONLY_DEGRADE=rotate|blur|speckle|jpeg|none`
//! applies just that degradation to every page (to see what each one costs).

use std::time::Instant;

use rayon::prelude::*;

use medpipe::data::render::{encode_png, render, RenderConfig};
use medpipe::data::synthetic;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(1000);
    let out = args.next();
    let mut cfg = RenderConfig::default();
    if let Ok(k) = std::env::var("ONLY_DEGRADE") {
        let d = &mut cfg.degrade;
        d.rotate_prob = if k == "rotate" { 1.0 } else { 0.0 };
        d.blur_prob = if k == "blur" { 1.0 } else { 0.0 };
        d.speckle_prob = if k == "speckle" { 1.0 } else { 0.0 };
        d.jpeg_prob = if k == "jpeg" { 1.0 } else { 0.0 };
    }
    let docs: Vec<_> = synthetic::documents(42, n).collect();
    let t = Instant::now();
    let pngs: Vec<Vec<u8>> = docs
        .par_iter()
        .enumerate()
        .map(|(i, d)| Ok(encode_png(&render(d, &cfg, i as u64)?.image)?))
        .collect::<anyhow::Result<_>>()?;
    let s = t.elapsed().as_secs_f64();
    println!(
        "{n} pages rendered + PNG-encoded in {s:.2} s: {:.0} pages/s on {} threads, {:.1} KiB/page",
        n as f64 / s,
        rayon::current_num_threads(),
        pngs.iter().map(Vec::len).sum::<usize>() as f64 / n as f64 / 1024.0
    );
    if let Some(dir) = out {
        std::fs::create_dir_all(&dir)?;
        for (d, png) in docs.iter().zip(&pngs).take(24) {
            std::fs::write(format!("{dir}/{}.png", d.id), png)?;
        }
    }
    Ok(())
}
