//! The `medpipe` command line: parse, validate, call the library, print once.
//!
//! Exit codes: 0 success, 1 a stage failed (its artifact records why), 2 usage, config or
//! lock error.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use medpipe::pipeline::{
    Event, RunError, RunOptions, RunReport, StageState, StatusOptions, Workspace,
};
use medpipe::{stages, Config};

#[derive(Parser, Debug)]
#[command(
    name = "medpipe",
    version,
    about = "Fine-tune Qwen2.5-VL to read clinical documents, resumably, with honest reports",
    long_about = "medpipe runs a phase-ordered pipeline (probe → download → baseline → quantize → \
prepare → train → evaluate → report). Each stage writes a JSON artifact under reports/ that the \
next consumes; a stage whose inputs did not change is skipped, and after a failure `medpipe run` \
resumes at the failed stage.",
    after_help = "Examples:\n  medpipe run                          # whole pipeline, embedded tiny model, CPU\n  medpipe run --to probe               # just record the environment\n  medpipe status                       # where every stage stands, and why\n  medpipe stages                       # the stages in order"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the pipeline (or a slice of it); up-to-date stages are skipped.
    #[command(
        after_help = "Examples:\n  medpipe run\n  medpipe run --config pipeline/qwen2.5-vl-7b.toml --device cuda\n  medpipe run --from quantize --to evaluate     # re-run a slice; upstream artifacts reused\n  medpipe run --only probe --set probe.device=cpu"
    )]
    Run(RunArgs),
    /// Show each stage's state (completed, failed, stale with the reason, missing).
    #[command(
        after_help = "Examples:\n  medpipe status\n  medpipe status --json | jq '.[] | select(.state != \"completed\")'\n  medpipe status --verify                # re-hash every output"
    )]
    Status(StatusArgs),
    /// List the stages in pipeline order with what each does.
    Stages,
    /// Run one full forward pass of a checkpoint on saved inputs (parity harness): writes
    /// logits, image_embeds and position_ids as f32 safetensors.
    #[command(
        after_help = "Example:\n  medpipe forward --model ../shared/fixtures/qwen2_5_vl_tiny \\\n    --inputs ../shared/fixtures/qwen2_5_vl_tiny/reference.safetensors --out /tmp/out.safetensors"
    )]
    Forward(ForwardArgs),
    /// Quantize a checkpoint directory to bitsandbytes NF4 (double quant), outside the pipeline.
    #[command(
        after_help = "Examples:\n  medpipe quantize --model models/qwen2.5-vl-7b --out checkpoints/nf4\n  medpipe quantize --model M --out O --skip lm_head --skip visual.merger"
    )]
    Quantize(QuantizeArgs),
    /// Benchmark a model on the five evaluation documents: load time, memory, latency
    /// statistics, tokens/s, batch sweep; or compare two result files.
    #[command(
        after_help = "Examples:\n  medpipe bench --model builtin:tiny --runs 3 --batch-sizes 1,2 --output bench.json\n  medpipe bench --model checkpoints/base --runs 10 --batch-sizes 1,2,4,8 --grid-new-tokens 32,128 --price-per-hour 2.5\n  medpipe bench --model builtin:tiny --soak-seconds 60 --output soak.json\n  medpipe bench --compare before.json after.json\n  medpipe bench --train --model checkpoints/nf4 --seq-len 512 --recompute layers --output train.json\n  medpipe bench --train --model builtin:tiny --peers 2 --seq-len 256"
    )]
    Bench(BenchArgs),
    /// Answer one prompt about one or more images, printing the answer and its timing.
    #[command(
        after_help = "Example:\n  medpipe generate --model builtin:tiny --image scan.png --prompt \"List the lab values\""
    )]
    Generate(GenerateArgs),
    /// Serve a model over HTTP: POST /v1/extract and /v1/analyze (batched), a demo page at /,
    /// /health, /metrics (Prometheus), /v1/benchmark and /openapi.json. Stops on SIGTERM or
    /// Ctrl-C after finishing the requests in flight.
    #[command(
        after_help = "Examples:\n  medpipe serve                                   # builtin:tiny on 127.0.0.1:8080\n  medpipe serve --workspace . --variant nf4+adapter --port 9000\n  medpipe serve --model checkpoints/nf4 --adapter checkpoints/adapter --device cuda\n  curl -F image=@page.png http://127.0.0.1:8080/v1/extract"
    )]
    Serve(ServeArgs),
    /// Predict each model stage's peak memory (weights, KV cache, activations, optimizer)
    /// from the model's config.json, without reading weights, and whether it fits the
    /// device's free memory. Exits 1 when a stage will not fit.
    #[command(
        after_help = "Every model stage runs this check itself before it loads anything, and \
refuses with the settings that would make it fit.\n\nExamples:\n  medpipe plan                                   # the default pipeline (builtin:tiny)\n  medpipe plan --config pipeline/qwen2.5-vl-7b.toml --device cuda\n  medpipe plan --model models/qwen2.5-vl-7b --set model.max_pixels=401408 --json\n  medpipe plan --measure                         # run baseline's generation once, measured"
    )]
    Plan(PlanArgs),
}

#[derive(Args, Debug)]
struct PlanArgs {
    #[command(flatten)]
    cfg: ConfigArgs,
    /// Model to plan for: a Hugging Face layout directory or builtin:tiny. Default: the
    /// config's [model] (the workspace's downloaded copy once the download stage ran).
    #[arg(long, value_name = "DIR|builtin:tiny")]
    model: Option<String>,
    /// Device to plan for: auto (what this machine would choose), cpu, cuda, cuda:N or
    /// wgpu; a GPU can be planned for on a machine without one (set
    /// model.memory_limit_mib to its memory). The stages are planned in the config's
    /// model.dtype on that device (auto: bf16 on CUDA, f16 on wgpu, f32 on the CPU).
    #[arg(long, value_name = "DEVICE", default_value = "auto")]
    device: String,
    /// Print JSON instead of the table.
    #[arg(long)]
    json: bool,
    /// Also run the baseline stage's generation once (its largest batch, an image at
    /// max_pixels) on the CPU, and print the measured peak beside the prediction.
    #[arg(long)]
    measure: bool,
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// Model: a Hugging Face layout directory, or builtin:tiny. Default: the workspace's
    /// variant with --workspace, else builtin:tiny.
    #[arg(long, value_name = "DIR|builtin:tiny")]
    model: Option<String>,
    /// peft LoRA adapter directory to attach to --model.
    #[arg(long, value_name = "DIR", requires = "model")]
    adapter: Option<PathBuf>,
    /// A medpipe workspace: serves the variant its reports/FINAL_REPORT.json recommends (or
    /// --variant), and shows its figures at /v1/benchmark and in the page's model card.
    #[arg(long, value_name = "DIR")]
    workspace: Option<PathBuf>,
    /// The workspace variant to serve instead of the recommended one: base, nf4 or nf4+adapter.
    #[arg(
        long,
        value_name = "NAME",
        requires = "workspace",
        conflicts_with = "model"
    )]
    variant: Option<String>,
    /// Device: auto, cpu, cuda, cuda:N or wgpu (as for `generate`).
    #[arg(long, value_name = "DEVICE", default_value = "auto")]
    device: String,
    /// Compute precision: f32 (everywhere), f16 (wgpu, cuda), bf16 (cuda), or auto (as
    /// `[model] dtype`: bf16 on CUDA, f16 on wgpu with shader-f16, else f32).
    #[arg(long, value_name = "DTYPE", default_value = "f32")]
    dtype: String,
    /// Address to listen on (0.0.0.0 exposes the server to the network).
    #[arg(long, value_name = "IP", default_value = "127.0.0.1")]
    host: std::net::IpAddr,
    /// Port (0: any free port; the address is printed at start).
    #[arg(long, value_name = "PORT", default_value_t = 8080)]
    port: u16,
    /// Requests generated together at most.
    #[arg(long, value_name = "N", default_value_t = 16)]
    max_batch: usize,
    /// Milliseconds the model waits for more requests to join a batch.
    #[arg(long, value_name = "MS", default_value_t = 10)]
    batch_wait_ms: u64,
    /// Requests waiting at most; beyond it requests get 503 with Retry-After.
    #[arg(long, value_name = "N", default_value_t = 64)]
    max_queue: usize,
    /// New tokens a request may ask for at most (also the default).
    #[arg(long, value_name = "N", default_value_t = 128)]
    max_new_tokens: usize,
    /// Images per request at most.
    #[arg(long, value_name = "N", default_value_t = 4)]
    max_images: usize,
    /// Largest request body, MB (413 above it).
    #[arg(long, value_name = "MB", default_value_t = 20)]
    max_body_mb: usize,
    /// Seconds a request may wait for its answer (504 after).
    #[arg(long, value_name = "S", default_value_t = 120)]
    timeout_s: u64,
}

#[derive(Args, Debug)]
struct BenchArgs {
    /// Model: a Hugging Face layout directory, or builtin:tiny (materialized into the cache).
    #[arg(long, value_name = "DIR|builtin:tiny", default_value = "builtin:tiny")]
    model: String,
    /// Measured passes over the five documents per batch size.
    #[arg(long, value_name = "N", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    runs: u64,
    /// Warm-up calls per batch size, excluded from the figures.
    #[arg(long, value_name = "N", default_value_t = 1)]
    warmup: usize,
    /// Batch sizes to sweep, comma separated (batched generation).
    #[arg(long, value_name = "LIST", default_value = "1")]
    batch_sizes: String,
    /// New tokens at most per request.
    #[arg(long, value_name = "N", default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..))]
    max_new_tokens: u64,
    /// Sequence-length axis of a batch × length grid: max_new_tokens values, comma separated.
    #[arg(long, value_name = "LIST")]
    grid_new_tokens: Option<String>,
    /// Bounded soak run at batch size 1 for this many seconds (throughput over time, RSS slope).
    #[arg(long, value_name = "S", default_value_t = 0.0)]
    soak_seconds: f64,
    /// Price of one device-hour, for the cost per 1,000 requests.
    #[arg(long, value_name = "PRICE")]
    price_per_hour: Option<f64>,
    /// Currency of --price-per-hour.
    #[arg(long, value_name = "CODE", default_value = "USD")]
    currency: String,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Sampling seed, and the seed of builtin:tiny.
    #[arg(long, value_name = "N", default_value_t = 0)]
    seed: u64,
    /// Device: auto (a CUDA GPU when built with CUDA and one is free, else a hardware wgpu
    /// adapter, else the CPU), cpu, cuda, cuda:N, or wgpu (any Vulkan/Metal/DX12 adapter,
    /// software ones such as lavapipe included).
    #[arg(long, value_name = "DEVICE", default_value = "auto")]
    device: String,
    /// Compute precision: f32 (everywhere), f16 (wgpu, cuda), bf16 (cuda), or auto (as
    /// `[model] dtype`: bf16 on CUDA, f16 on wgpu with shader-f16, else f32).
    #[arg(long, value_name = "DTYPE", default_value = "f32")]
    dtype: String,
    /// Write the result JSON here (plus FILE.md and charts beside it); else print the table.
    #[arg(long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// Also save the rendered input documents as PNG files in this directory.
    #[arg(long, value_name = "DIR")]
    save_inputs: Option<PathBuf>,
    /// Compare two result files instead of measuring.
    #[arg(long, num_args = 2, value_names = ["A.json", "B.json"])]
    compare: Option<Vec<PathBuf>>,
    /// Benchmark QLoRA training instead of generation: --steps optimizer steps of
    /// --micro-batch synthetic samples of --seq-len tokens through the train stage's
    /// trainer, reporting samples/s, tokens/s and the memory the steps add beside the
    /// planner's prediction. Give --model the quantize stage's NF4 checkpoint
    /// (checkpoints/nf4) to measure QLoRA proper; a dense one trains LoRA on a dense base.
    #[arg(long)]
    train: bool,
    /// --train: measured optimizer steps (one warm-up read interval runs first).
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
    steps: u64,
    /// --train: tokens per sample.
    #[arg(long, value_name = "N", default_value_t = 512)]
    seq_len: usize,
    /// --train: samples per optimizer step.
    #[arg(long, value_name = "N", default_value_t = 1)]
    micro_batch: usize,
    /// --train: LoRA rank (alpha = 2 r, dropout 0.05).
    #[arg(long, value_name = "R", default_value_t = 16)]
    lora_r: usize,
    /// --train: layer recomputation, as train.recompute: none, layers or every_n:K.
    #[arg(long, value_name = "MODE", default_value = "none")]
    recompute: String,
    /// --train: data parallel peers on the device (train.devices naming it N times); each
    /// runs one micro-batch per step, so a step takes N × --micro-batch samples.
    #[arg(long, value_name = "N", default_value_t = 1)]
    peers: usize,
    /// --train: read the loss back every N steps, as train.log_every: between reads no step
    /// waits for the device. N warm-up steps run first; each measured step is timed as its
    /// share of its interval.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    log_every: u64,
}

#[derive(Args, Debug)]
struct GenerateArgs {
    /// Model: a Hugging Face layout directory, or builtin:tiny.
    #[arg(long, value_name = "DIR|builtin:tiny")]
    model: String,
    /// Image file (PNG or JPEG); repeat for several.
    #[arg(long = "image", value_name = "FILE")]
    images: Vec<PathBuf>,
    /// The user prompt.
    #[arg(long, value_name = "TEXT")]
    prompt: String,
    /// New tokens at most (prompt plus new tokens must fit the model's
    /// max_position_embeddings).
    #[arg(long, value_name = "N", default_value_t = 128, value_parser = clap::value_parser!(u64).range(1..))]
    max_new_tokens: u64,
    /// peft LoRA adapter directory to attach to the language model (as `forward --adapter`).
    #[arg(long, value_name = "DIR")]
    adapter: Option<PathBuf>,
    /// Device: auto (a CUDA GPU when built with CUDA and one is free, else a hardware wgpu
    /// adapter, else the CPU), cpu, cuda, cuda:N, or wgpu (any Vulkan/Metal/DX12 adapter,
    /// software ones such as lavapipe included).
    #[arg(long, value_name = "DEVICE", default_value = "auto")]
    device: String,
    /// Compute precision: f32 (everywhere), f16 (wgpu, cuda), bf16 (cuda), or auto (as
    /// `[model] dtype`: bf16 on CUDA, f16 on wgpu with shader-f16, else f32).
    #[arg(long, value_name = "DTYPE", default_value = "f32")]
    dtype: String,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// --do-sample: seed of the draw (the same seed, prompt and settings give the same answer).
    #[arg(long, value_name = "N", default_value_t = 0)]
    seed: u64,
}

/// How the next token is chosen (`generate`, `bench`).
#[derive(Args, Debug)]
struct SamplingArgs {
    /// Sample instead of greedy decoding (with --temperature, --top-k, --top-p, --seed), on
    /// the device: only the token ids are read back.
    #[arg(long)]
    do_sample: bool,
    /// --do-sample: logits are divided by this (> 0).
    #[arg(long, value_name = "T", default_value_t = 1.0)]
    temperature: f32,
    /// --do-sample: keep the K most likely tokens (ties at the K-th kept; 0 = all).
    #[arg(long, value_name = "K", default_value_t = 0)]
    top_k: usize,
    /// --do-sample: keep the tokens whose more likely tokens hold less than P (1 = all).
    #[arg(long, value_name = "P", default_value_t = 1.0)]
    top_p: f32,
}

impl SamplingArgs {
    fn sampling(&self) -> medpipe::model::Sampling {
        if self.do_sample {
            medpipe::model::Sampling::Sample {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
            }
        } else {
            medpipe::model::Sampling::Greedy
        }
    }
}

#[derive(Args, Debug)]
struct ForwardArgs {
    /// Checkpoint directory (config.json, model.safetensors or a shard index).
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// Inputs: `input_ids` [batch, seq] (I64/I32), optional `pixel_values` + `image_grid_thw`.
    #[arg(long, value_name = "IN.safetensors")]
    inputs: PathBuf,
    /// Output file for `logits`, `image_embeds`, `position_ids` (f32).
    #[arg(long, value_name = "OUT.safetensors")]
    out: PathBuf,
    /// peft LoRA adapter directory to attach to the language model.
    #[arg(long, value_name = "DIR")]
    adapter: Option<PathBuf>,
    /// Merge the adapter into the dense weights before the forward.
    #[arg(long, requires = "adapter")]
    merge: bool,
    /// Device: cpu (the f32 reference path), cuda, cuda:N, wgpu or auto.
    #[arg(long, value_name = "DEVICE", default_value = "cpu")]
    device: String,
    /// Compute precision: f32 (everywhere), f16 (wgpu, cuda), bf16 (cuda), or auto (as
    /// `[model] dtype`: bf16 on CUDA, f16 on wgpu with shader-f16, else f32). Outputs are
    /// written as f32.
    #[arg(long, value_name = "DTYPE", default_value = "f32")]
    dtype: String,
    /// Also generate N tokens greedily per row (KV cache, no eos stop) and write them as
    /// `greedy_new_tokens` (I64).
    #[arg(long, value_name = "N", default_value_t = 0)]
    greedy: usize,
}

#[derive(Args, Debug)]
struct QuantizeArgs {
    /// Checkpoint directory (config.json + model.safetensors or a sharded index).
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// Output directory (replaced atomically when the run succeeds).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Module to keep unquantized, dotted (repeatable), in addition to lm_head; an entry that
    /// matches no Linear weight is an error.
    #[arg(long, value_name = "MODULE")]
    skip: Vec<String>,
    /// bnb_4bit_compute_dtype to record. Default: the checkpoint's torch_dtype.
    #[arg(long, value_name = "DTYPE")]
    compute_dtype: Option<String>,
}

#[derive(Args, Debug)]
struct ConfigArgs {
    /// Pipeline config (TOML). Default: the embedded pipeline/default.toml (builtin:tiny, CPU).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Override a config key, type-checked like the file: `--set prepare.seed=7` (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    set: Vec<String>,
    /// Workspace directory for data/, checkpoints/, reports/, BUILD_LOG.md.
    #[arg(long, value_name = "DIR", default_value = ".")]
    workspace: PathBuf,
}

#[derive(Args, Debug)]
struct RunArgs {
    #[command(flatten)]
    cfg: ConfigArgs,
    /// Force this stage and every later one to run.
    #[arg(long, value_name = "STAGE")]
    from: Option<String>,
    /// Stop after this stage.
    #[arg(long, value_name = "STAGE")]
    to: Option<String>,
    /// Run only this stage (forced); its upstream artifacts must already exist.
    #[arg(long, value_name = "STAGE", conflicts_with_all = ["from", "to"])]
    only: Option<String>,
    /// Re-run every stage in the range even if up to date.
    #[arg(long)]
    force: bool,
    /// Device for model work: auto, cpu, cuda, cuda:N or wgpu (same as --set probe.device=…).
    #[arg(long, value_name = "DEVICE")]
    device: Option<String>,
    /// No progress bars.
    #[arg(long, short)]
    quiet: bool,
}

#[derive(Args, Debug)]
struct StatusArgs {
    #[command(flatten)]
    cfg: ConfigArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Re-hash every output (reads all of them) instead of trusting files whose size and
    /// modification time are as recorded; catches an edit that kept both.
    #[arg(long)]
    verify: bool,
}

/// A failure with the exit code it maps to.
struct Failure {
    code: u8,
    error: anyhow::Error,
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure {
            code: 2,
            error: e.into(),
        }
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        // colour codes only for a terminal, not for a log file
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    match dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("medpipe: error: {:#}", f.error);
            ExitCode::from(f.code)
        }
    }
}

fn dispatch(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::Run(args) => run(args),
        Command::Status(args) => status(args),
        Command::Forward(args) => forward(args),
        Command::Quantize(args) => quantize(args),
        Command::Bench(args) => bench(args),
        Command::Generate(args) => generate(args),
        Command::Serve(args) => serve(args),
        Command::Plan(args) => plan(args),
        Command::Stages => {
            for (i, s) in stages::pipeline().stages().enumerate() {
                println!(
                    "{:>2}. {:<10} {}  → reports/{}",
                    i + 1,
                    s.name(),
                    s.description(),
                    s.artifact_file()
                );
            }
            Ok(())
        }
    }
}

/// `medpipe plan`: every model stage's predicted peak against the device's memory; exit 1
/// when one will not fit.
fn plan(args: PlanArgs) -> Result<(), Failure> {
    use medpipe::stages::memory;
    let config = stages::load_config(args.cfg.config.as_deref(), &args.cfg.set)?;
    let dir = match &args.model {
        Some(m) => {
            medpipe::bench::source::resolve_model(m, 0).with_context(|| format!("--model {m}"))?
        }
        None => memory::model_dir_for_plan(&config.settings, &args.cfg.workspace)?,
    };
    // A named device is planned for even where it is absent (sizing a GPU before renting
    // one); `auto` is what this machine would choose.
    let device = if args.device == "auto" {
        placement(&args.device, &dir.display().to_string())?
    } else {
        medpipe::device::Device::parse(&args.device).map_err(|e| Failure {
            code: 2,
            error: anyhow::Error::new(e).context("--device"),
        })?
    };
    let report = memory::PlanReport::new(&config.settings, &dir, device)?;
    let measured = if args.measure {
        let facts = memory::ModelFacts::read(&dir, &config.model)?;
        let knobs = memory::Knobs::read(&config.settings, &facts)?;
        let probe = medpipe::bench::footprint::Probe {
            batch: knobs.baseline_batch,
            new_tokens: knobs.baseline_new_tokens,
            pixel_bounds: [config.model.min_pixels, config.model.max_pixels],
            format: memory::stored_format(&dir),
            stored: facts.stored,
        };
        Some(
            medpipe::bench::footprint::measure(device, &dir, &probe)
                .with_context(|| format!("measuring a generation of {}", dir.display()))?,
        )
    } else {
        None
    };
    if args.json {
        let mut v = serde_json::to_value(&report)?;
        if let (Some(m), Some(obj)) = (&measured, v.as_object_mut()) {
            obj.insert("measured".into(), serde_json::to_value(m)?);
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{}", report.table());
        if let Some(m) = &measured {
            println!(
                "\nmeasured: batch {} of {} prompt tokens (an image of {} px), {} new tokens: \
                 predicted {}, measured {} (resident growth), ratio {:.2}",
                m.batch,
                m.prompt_tokens,
                m.image_pixels,
                m.new_tokens,
                memory::gib(m.predicted_bytes),
                memory::gib(m.measured_bytes),
                m.ratio
            );
        }
    }
    if report.all_fit() {
        Ok(())
    } else {
        Err(Failure {
            code: 1,
            error: anyhow::anyhow!(
                "a stage will not fit in {} ({}): see the table",
                report.budget.bytes.map_or("unknown".into(), memory::gib),
                report.budget.source
            ),
        })
    }
}

/// The `--dtype` value for `device`; a precision the device cannot compute in is a usage
/// error (exit 2).
fn precision(
    flag: &str,
    device: medpipe::device::Device,
) -> Result<medpipe::device::Precision, Failure> {
    let parsed = match flag {
        "auto" => medpipe::config::ModelDtype::Auto.resolve(device),
        _ => medpipe::device::Precision::parse(flag),
    };
    if let Err(medpipe::device::PrecisionError::Unknown(_)) = parsed {
        return Err(Failure {
            code: 2,
            error: anyhow::anyhow!(
                "--dtype: unknown dtype `{flag}` (expected f32, f16, bf16 or auto)"
            ),
        });
    }
    parsed
        .and_then(|p| p.supported_on(device).map(|()| p))
        .map_err(|e| Failure {
            code: 2,
            error: anyhow::Error::new(e).context("--dtype"),
        })
}

fn forward(args: ForwardArgs) -> Result<(), Failure> {
    let device = placement(&args.device, &args.model.display().to_string())?;
    let precision = precision(&args.dtype, device)?;
    let job = medpipe::model::parity::ForwardJob {
        model_dir: args.model,
        adapter: args.adapter,
        merge: args.merge,
        inputs: args.inputs,
        out: args.out,
        greedy: args.greedy,
    };
    let report =
        medpipe::model::parity::run_forward_as(device, precision, &job).map_err(|e| Failure {
            code: 1,
            error: anyhow::Error::new(e).context(format!("forward of {}", job.model_dir.display())),
        })?;
    println!(
        "wrote {}: logits {:?}, {} image tokens",
        job.out.display(),
        report.logits_shape,
        report.image_tokens
    );
    Ok(())
}

fn quantize(args: QuantizeArgs) -> Result<(), Failure> {
    let mut opts = medpipe::quant::QuantizeOptions::default();
    // `--skip` adds to the default (lm_head) rather than replacing it.
    for s in args.skip {
        if !opts.skip.contains(&s) {
            opts.skip.push(s);
        }
    }
    opts.compute_dtype = args.compute_dtype;
    let r =
        medpipe::quant::quantize_checkpoint(&args.model, &args.out, &opts).with_context(|| {
            format!(
                "quantizing {} into {}",
                args.model.display(),
                args.out.display()
            )
        })?;
    let (rmse, max) = r.worst_errors();
    println!(
        "quantized {} Linear weights, skipped {}, copied {} other tensors into {} shard(s)",
        r.tensors_quantized, r.tensors_skipped, r.tensors_copied, r.shards
    );
    println!(
        "size: {:.1} MB → {:.1} MB; worst RMSE {rmse:.3e}, worst max |err| {max:.3e}",
        r.bytes_before as f64 / 1e6,
        r.bytes_after as f64 / 1e6
    );
    println!(
        "time: {:.2} s total, quantization {:.1} MB/s; output {}",
        r.elapsed_s,
        r.throughput_mb_per_s(),
        args.out.display()
    );
    if let Some((_, peak)) = medpipe::bench::memory::rss_bytes() {
        println!("memory: peak RSS {:.1} MB", peak as f64 / 1e6);
    }
    Ok(())
}

/// The device a `--device` value stands for on this machine, for the model `model`
/// (usage error, exit 2, when this binary or machine cannot honour it).
fn placement(flag: &str, model: &str) -> Result<medpipe::device::Device, Failure> {
    let p = medpipe::device::resolve(flag, 0, model).with_context(|| format!("--device {flag}"))?;
    tracing::info!(device = %p.device, reason = %p.reason, "device");
    Ok(p.device)
}

fn bench(args: BenchArgs) -> Result<(), Failure> {
    use medpipe::bench::{self, BenchResult};
    if let Some(files) = &args.compare {
        let read = |p: &PathBuf| -> Result<BenchResult, Failure> {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            Ok(serde_json::from_str(&text)
                .with_context(|| format!("{} is not a medpipe bench result", p.display()))?)
        };
        let (a, b) = (read(&files[0])?, read(&files[1])?);
        let name = |p: &PathBuf| p.display().to_string();
        print!(
            "{}",
            bench::compare::markdown(&name(&files[0]), &name(&files[1]), &a, &b)
        );
        return Ok(());
    }
    let device = placement(&args.device, &args.model)?;
    let precision = precision(&args.dtype, device)?;
    if args.train {
        return bench_train(&args, device, precision);
    }
    let opts = bench::BenchOptions {
        model_id: args.model.clone(),
        revision: None,
        warmup_runs: args.warmup,
        runs: args.runs as usize,
        batch_sizes: bench::parse_list("--batch-sizes", &args.batch_sizes)?,
        max_new_tokens: args.max_new_tokens as usize,
        grid_max_new_tokens: match &args.grid_new_tokens {
            Some(t) => bench::parse_list("--grid-new-tokens", t)?,
            None => Vec::new(),
        },
        soak_seconds: args.soak_seconds,
        price_per_device_hour: args.price_per_hour,
        currency: args.currency.clone(),
        sampling: args.sampling.sampling(),
        seed: args.seed,
        pixel_bounds: [None, None],
    };
    opts.validate()?;
    let dir = bench::source::resolve_model(&args.model, args.seed)?;
    let inputs = bench::inputs::evaluation_documents().map_err(|e| Failure {
        code: 1,
        error: e.into(),
    })?;
    if let Some(d) = &args.save_inputs {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        for i in &inputs {
            let path = d.join(format!("{}.png", i.name));
            i.image
                .save(&path)
                .with_context(|| format!("writing {}", path.display()))?;
        }
    }
    let result =
        bench::run_bench_as(device, precision, &dir, &opts, &inputs).map_err(|e| Failure {
            code: 1,
            error: anyhow::Error::new(e).context(format!("benchmarking {}", dir.display())),
        })?;
    match &args.output {
        Some(out) => {
            let files = bench::output::write_result(&result, out).map_err(|e| Failure {
                code: 1,
                error: e.into(),
            })?;
            print!("{}", bench::markdown::results_table(&result));
            println!();
            for f in files {
                println!("wrote {}", f.display());
            }
        }
        None => print!("{}", bench::output::markdown_document(&result)),
    }
    Ok(())
}

fn bench_train(
    args: &BenchArgs,
    device: medpipe::device::Device,
    precision: medpipe::device::Precision,
) -> Result<(), Failure> {
    use medpipe::bench::train::{self, TrainBenchOptions};
    let usage = |e: anyhow::Error| Failure { code: 2, error: e };
    let opts = TrainBenchOptions {
        steps: usize::try_from(args.steps).unwrap_or(usize::MAX),
        warmup_steps: usize::try_from(args.log_every).unwrap_or(usize::MAX),
        micro_batch: args.micro_batch,
        seq_len: args.seq_len,
        lora_r: args.lora_r,
        recompute: args
            .recompute
            .parse()
            .map_err(|e: String| usage(anyhow::anyhow!("--recompute: {e}")))?,
        seed: args.seed,
        peers: args.peers,
        log_every: usize::try_from(args.log_every).unwrap_or(usize::MAX),
    };
    opts.validate().map_err(|e| usage(e.into()))?;
    let dir = medpipe::bench::source::resolve_model(&args.model, args.seed)?;
    let result =
        train::run_train_bench_as(device, precision, &dir, &args.model, &opts).map_err(|e| {
            Failure {
                code: 1,
                error: anyhow::Error::new(e)
                    .context(format!("training benchmark on {}", dir.display())),
            }
        })?;
    print!("{}", train::markdown(&result));
    if let Some(out) = &args.output {
        medpipe::fs::write_json_atomic(out, &result)
            .with_context(|| format!("writing {}", out.display()))?;
        println!("wrote {}", out.display());
    }
    Ok(())
}

fn generate(args: GenerateArgs) -> Result<(), Failure> {
    let sampling = args.sampling.sampling();
    sampling.check().map_err(|e| Failure {
        code: 2,
        error: anyhow::anyhow!("--do-sample: {e}"),
    })?;
    let device = placement(&args.device, &args.model)?;
    let precision = precision(&args.dtype, device)?;
    let dir = medpipe::bench::source::resolve_model(&args.model, 0)?;
    let job = medpipe::bench::oneshot::GenerateJob {
        model_dir: dir.clone(),
        adapter: args.adapter,
        images: args.images,
        prompt: args.prompt,
        max_new_tokens: usize::try_from(args.max_new_tokens).unwrap_or(usize::MAX),
        sampling,
        seed: args.seed,
    };
    let a = medpipe::bench::oneshot::generate_answer_as(device, precision, &job).map_err(|e| {
        Failure {
            // A request the model cannot hold is a usage error, refused before any work.
            code: if matches!(e, medpipe::bench::BenchError::Invalid { .. }) {
                2
            } else {
                1
            },
            error: anyhow::Error::new(e).context(format!("generating with {}", dir.display())),
        }
    })?;
    println!("{}", a.text);
    let total = a.prefill_ms + a.decode_ms;
    eprintln!(
        "load {:.1} ms; preprocess {:.1} ms; prompt {} tokens; {} new tokens{}; time to first token {:.1} ms; decode {:.1} ms; total {:.1} ms ({:.1} tokens/s)",
        a.load_ms,
        a.preprocess_ms,
        a.prompt_tokens,
        a.new_tokens,
        if a.stopped_on_eos { " (stopped at end of sequence)" } else { "" },
        a.prefill_ms,
        a.decode_ms,
        total,
        if total > 0.0 { a.new_tokens as f64 / (total / 1e3) } else { 0.0 },
    );
    Ok(())
}

fn serve(args: ServeArgs) -> Result<(), Failure> {
    use medpipe::serve;
    let choice = match (&args.model, &args.workspace) {
        (Some(m), _) => serve::source::from_model(m, args.adapter.clone())?,
        (None, Some(ws)) => serve::source::from_workspace(ws, args.variant.as_deref())?,
        (None, None) => serve::source::from_model("builtin:tiny", None)?,
    };
    let device = placement(&args.device, &choice.model_dir.display().to_string())?;
    let precision = precision(&args.dtype, device)?;
    let opts = serve::ServeOptions {
        model: choice,
        device,
        precision,
        addr: std::net::SocketAddr::new(args.host, args.port),
        limits: serve::Limits {
            max_batch: args.max_batch,
            batch_wait: std::time::Duration::from_millis(args.batch_wait_ms),
            max_queue: args.max_queue,
            max_new_tokens: args.max_new_tokens,
            max_images: args.max_images,
            max_body_bytes: args.max_body_mb.saturating_mul(1024 * 1024),
            request_timeout: std::time::Duration::from_secs(args.timeout_s),
            ..serve::Limits::default()
        },
        workspace: args.workspace.clone(),
    };
    eprintln!(
        "medpipe serve: loading {} (variant {}: {}) on {device} ({precision})",
        opts.model.label, opts.model.variant, opts.model.reason
    );
    serve::serve(opts, |addr| {
        use std::io::Write;
        println!("medpipe serve: listening on http://{addr}");
        let _ = std::io::stdout().flush();
    })
    .map_err(|e| {
        let code = if matches!(e, serve::ServeError::Invalid(_)) {
            2
        } else {
            1
        };
        Failure {
            code,
            error: e.into(),
        }
    })
}

fn load(cfg: &ConfigArgs, extra: &[String]) -> Result<(Config, Workspace), Failure> {
    let mut sets = cfg.set.clone();
    sets.extend_from_slice(extra);
    let config = stages::load_config(cfg.config.as_deref(), &sets)?;
    let ws = Workspace::open(&cfg.workspace)
        .with_context(|| format!("opening workspace {}", cfg.workspace.display()))?;
    Ok((config, ws))
}

fn run(args: RunArgs) -> Result<(), Failure> {
    let extra: Vec<String> = args
        .device
        .iter()
        .map(|d| format!("probe.device={d}"))
        .collect();
    let (config, ws) = load(&args.cfg, &extra)?;
    let opts = RunOptions {
        from: args.from,
        to: args.to,
        only: args.only,
        force: args.force,
        quiet: args.quiet || !std::io::stderr().is_terminal(),
    };
    let pipeline = stages::pipeline();
    let mut on_event = |e: Event<'_>| match e {
        Event::Starting { stage, reason } => eprintln!("▶ {stage}: running ({reason})"),
        Event::Finished(r) => match r.action {
            "skipped" => eprintln!("· {}: skipped ({})", r.stage, r.reason),
            "failed" => eprintln!(
                "✗ {}: FAILED after {:.1} s: {}",
                r.stage,
                r.duration_s,
                r.error.as_deref().unwrap_or("")
            ),
            _ => eprintln!("✓ {}: done in {:.1} s", r.stage, r.duration_s),
        },
    };
    let report = pipeline
        .run(&ws, &config.settings, &opts, &mut on_event)
        .map_err(|e: RunError| Failure {
            code: 2,
            error: e.into(),
        })?;
    print_summary(&report, &ws);
    if report.failed() {
        let failed = report.stages.iter().find(|s| s.action == "failed");
        return Err(Failure {
            code: 1,
            error: anyhow::anyhow!(
                "stage `{}` failed (see reports/ and BUILD_LOG.md); fix the cause and `medpipe run` resumes there",
                failed.map(|s| s.stage.as_str()).unwrap_or("?")
            ),
        });
    }
    Ok(())
}

fn print_summary(report: &RunReport, ws: &Workspace) {
    println!(
        "\n{:<10} {:<8} {:>9}  key figures",
        "stage", "result", "time"
    );
    for s in &report.stages {
        let figures = s
            .summary
            .iter()
            .take(3)
            .map(|(k, v)| format!("{k}: {v}"))
            .collect::<Vec<_>>()
            .join("; ");
        println!(
            "{:<10} {:<8} {:>8.1}s  {}",
            s.stage, s.action, s.duration_s, figures
        );
    }
    println!(
        "\nworkspace: {} (reports/, BUILD_LOG.md)",
        ws.root().display()
    );
}

fn status(args: StatusArgs) -> Result<(), Failure> {
    let config = stages::load_config(args.cfg.config.as_deref(), &args.cfg.set)?;
    // Reading only: a mistyped --workspace must not leave a directory behind.
    let ws = Workspace::existing(&args.cfg.workspace)?;
    let opts = StatusOptions {
        verify: args.verify,
    };
    let states: Vec<StageState> = stages::pipeline().status_with(&ws, &config.settings, opts)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&states)?);
        return Ok(());
    }
    println!(
        "{:<10} {:<10} {:<21} {:>8}  details",
        "stage", "state", "finished", "time"
    );
    for s in &states {
        let details = if s.state == "completed" {
            s.summary
                .iter()
                .take(2)
                .map(|(k, v)| format!("{k}: {v}"))
                .collect::<Vec<_>>()
                .join("; ")
        } else {
            s.reason.clone()
        };
        println!(
            "{:<10} {:<10} {:<21} {:>8}  {}",
            s.stage,
            s.state,
            s.finished_at.as_deref().unwrap_or("-"),
            s.duration_s
                .map(|d| format!("{d:.1}s"))
                .unwrap_or_else(|| "-".into()),
            details
        );
    }
    Ok(())
}

#[cfg(test)]
mod cli;
