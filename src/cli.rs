//! The argument rules of the `medpipe` command line as clap enforces them, one test per rule
//! (`Cli::try_parse_from`, STYLE 9). Rules checked after parsing (stage names, the order of
//! `--from` and `--to`, device and config values) are specified by the integration tests.
//! Test-only: a child of `main.rs`, so it sees the private `Cli` and `precision`.

use clap::error::ErrorKind;
use medpipe::device::Device;

use super::*;

fn parse(args: &[&str]) -> Cli {
    Cli::try_parse_from(std::iter::once("medpipe").chain(args.iter().copied()))
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

/// The kind of clap's refusal of `args`, which `main` turns into exit 2.
#[track_caller]
fn refusal(args: &[&str]) -> ErrorKind {
    let e = Cli::try_parse_from(std::iter::once("medpipe").chain(args.iter().copied()))
        .err()
        .unwrap_or_else(|| panic!("{args:?} was accepted"));
    assert!(e.use_stderr(), "{args:?}: a usage error exits 2: {e}");
    e.kind()
}

fn run_args(args: &[&str]) -> RunArgs {
    match parse(&[&["run"], args].concat()).command {
        Command::Run(a) => a,
        c => panic!("not run: {c:?}"),
    }
}

fn bench_dtype(args: &[&str]) -> String {
    match parse(args).command {
        Command::Bench(a) => a.dtype,
        c => panic!("not bench: {c:?}"),
    }
}

#[test]
fn run_without_flags_runs_the_whole_pipeline_on_the_default_config_in_the_current_directory() {
    let a = run_args(&[]);
    assert_eq!((a.from, a.to, a.only), (None, None, None));
    assert!(!a.force && !a.quiet);
    assert_eq!(a.device, None);
    assert_eq!(a.cfg.config, None);
    assert!(a.cfg.set.is_empty());
    assert_eq!(a.cfg.workspace, PathBuf::from("."));
}

#[test]
fn run_only_is_refused_with_from_or_to() {
    for extra in [&["--from", "probe"][..], &["--to", "train"]] {
        let args = [&["run", "--only", "train"][..], extra].concat();
        assert_eq!(refusal(&args), ErrorKind::ArgumentConflict, "{args:?}");
    }
}

#[test]
fn run_from_and_to_parse_together_and_their_order_is_left_to_the_runner() {
    // `--from download --to probe` is refused after parsing (tests/it/cli.rs), by the
    // pipeline, which knows the stage order.
    let a = run_args(&["--from", "download", "--to", "probe", "--force"]);
    assert_eq!(a.from.as_deref(), Some("download"));
    assert_eq!(a.to.as_deref(), Some("probe"));
    assert!(a.force);
}

#[test]
fn run_set_is_repeatable_and_keeps_the_command_line_order() {
    let a = run_args(&["--set", "prepare.seed=7", "--set", "prepare.seed=8", "-q"]);
    assert_eq!(a.cfg.set, ["prepare.seed=7", "prepare.seed=8"]);
    assert!(a.quiet, "-q is --quiet");
}

#[test]
fn run_device_is_any_string_to_the_parser_and_checked_with_the_config() {
    // It becomes `--set probe.device=…`; a bad value exits 2 before any work
    // (tests/it/trust.rs).
    for d in ["auto", "cpu", "cuda:1", "wgpu", "cpuu"] {
        assert_eq!(run_args(&["--device", d]).device.as_deref(), Some(d));
    }
}

#[test]
fn an_unknown_flag_is_refused_for_every_subcommand() {
    for sub in [
        "run", "status", "stages", "forward", "quantize", "bench", "generate", "serve", "plan",
    ] {
        assert_eq!(
            refusal(&[sub, "--frobnicate"]),
            ErrorKind::UnknownArgument,
            "{sub}"
        );
    }
}

#[test]
fn a_subcommand_is_required_and_an_unknown_one_is_refused() {
    assert_eq!(
        refusal(&[]),
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    );
    assert_eq!(refusal(&["trian"]), ErrorKind::InvalidSubcommand);
}

#[test]
fn a_flag_missing_its_value_is_refused() {
    assert_eq!(refusal(&["run", "--to"]), ErrorKind::InvalidValue);
    assert_eq!(refusal(&["run", "--set"]), ErrorKind::InvalidValue);
}

#[test]
fn status_defaults_to_the_table_trusting_unchanged_stats() {
    let Command::Status(a) = parse(&["status"]).command else {
        panic!("not status")
    };
    assert!(!a.json && !a.verify);
    assert_eq!(a.cfg.workspace, PathBuf::from("."));
    let Command::Status(a) = parse(&["status", "--json", "--verify"]).command else {
        panic!("not status")
    };
    assert!(a.json && a.verify);
}

#[test]
fn forward_requires_model_inputs_and_out() {
    let all = ["--model", "m", "--inputs", "i", "--out", "o"];
    for left_out in [0, 2, 4] {
        let mut args = vec!["forward"];
        args.extend(
            all.iter()
                .enumerate()
                .filter_map(|(i, a)| (i != left_out && i != left_out + 1).then_some(*a)),
        );
        assert_eq!(
            refusal(&args),
            ErrorKind::MissingRequiredArgument,
            "{args:?}"
        );
    }
}

#[test]
fn forward_defaults_to_the_f32_cpu_reference_path_without_greedy_tokens() {
    let Command::Forward(a) =
        parse(&["forward", "--model", "m", "--inputs", "i", "--out", "o"]).command
    else {
        panic!("not forward")
    };
    assert_eq!((a.device.as_str(), a.dtype.as_str()), ("cpu", "f32"));
    assert_eq!(a.greedy, 0);
    assert!(a.adapter.is_none() && !a.merge);
}

#[test]
fn forward_merge_requires_an_adapter() {
    let base = [
        "forward", "--model", "m", "--inputs", "i", "--out", "o", "--merge",
    ];
    assert_eq!(refusal(&base), ErrorKind::MissingRequiredArgument);
    let Command::Forward(a) = parse(&[&base[..], &["--adapter", "a"]].concat()).command else {
        panic!("not forward")
    };
    assert!(a.merge);
    assert_eq!(a.adapter, Some(PathBuf::from("a")));
}

#[test]
fn quantize_requires_model_and_out_and_skip_is_repeatable() {
    assert_eq!(
        refusal(&["quantize", "--model", "m"]),
        ErrorKind::MissingRequiredArgument
    );
    assert_eq!(
        refusal(&["quantize", "--out", "o"]),
        ErrorKind::MissingRequiredArgument
    );
    let Command::Quantize(a) = parse(&[
        "quantize", "--model", "m", "--out", "o", "--skip", "a.b", "--skip", "c",
    ])
    .command
    else {
        panic!("not quantize")
    };
    assert_eq!(a.skip, ["a.b", "c"]);
    assert_eq!(
        a.compute_dtype, None,
        "default: the checkpoint's torch_dtype"
    );
}

#[test]
fn bench_defaults_measure_builtin_tiny_greedily_five_times_at_batch_size_one() {
    let Command::Bench(a) = parse(&["bench"]).command else {
        panic!("not bench")
    };
    assert_eq!(a.model, "builtin:tiny");
    assert_eq!((a.runs, a.warmup, a.max_new_tokens), (5, 1, 32));
    assert_eq!(a.batch_sizes, "1");
    assert_eq!((a.device.as_str(), a.dtype.as_str()), ("auto", "f32"));
    assert_eq!(a.soak_seconds, 0.0);
    assert_eq!(a.currency, "USD");
    assert!(!a.sampling.do_sample && a.compare.is_none() && a.output.is_none());
}

#[test]
fn bench_runs_and_max_new_tokens_must_be_at_least_one() {
    assert_eq!(
        refusal(&["bench", "--runs", "0"]),
        ErrorKind::ValueValidation
    );
    assert_eq!(
        refusal(&["bench", "--max-new-tokens", "0"]),
        ErrorKind::ValueValidation
    );
    assert_eq!(
        refusal(&["bench", "--runs", "two"]),
        ErrorKind::ValueValidation
    );
}

#[test]
fn bench_compare_takes_exactly_two_files() {
    assert_eq!(
        refusal(&["bench", "--compare", "a.json"]),
        ErrorKind::WrongNumberOfValues
    );
    let Command::Bench(a) = parse(&["bench", "--compare", "a.json", "b.json"]).command else {
        panic!("not bench")
    };
    assert_eq!(
        a.compare,
        Some(vec![PathBuf::from("a.json"), PathBuf::from("b.json")])
    );
}

#[test]
fn generate_requires_model_and_prompt_and_takes_images_repeatedly() {
    assert_eq!(
        refusal(&["generate", "--prompt", "p"]),
        ErrorKind::MissingRequiredArgument
    );
    assert_eq!(
        refusal(&["generate", "--model", "m"]),
        ErrorKind::MissingRequiredArgument
    );
    let Command::Generate(a) = parse(&[
        "generate", "--model", "m", "--prompt", "p", "--image", "a.png", "--image", "b.png",
    ])
    .command
    else {
        panic!("not generate")
    };
    assert_eq!(a.images, [PathBuf::from("a.png"), PathBuf::from("b.png")]);
    assert_eq!((a.device.as_str(), a.dtype.as_str()), ("auto", "f32"));
    assert_eq!(a.max_new_tokens, 128);
}

#[test]
fn dtype_is_checked_after_parsing_f32_anywhere_half_precision_off_the_cpu() {
    // clap takes any string; `precision` refuses with exit 2.
    for d in ["f32", "f16", "bf16", "fp8"] {
        assert_eq!(bench_dtype(&["bench", "--dtype", d]), d);
    }
    for (flag, device) in [
        ("f32", Device::Cpu),
        ("float32", Device::Cpu),
        ("f16", Device::Wgpu),
    ] {
        assert!(precision(flag, device).is_ok(), "{flag} on {device}");
    }
    for (flag, device) in [
        ("f16", Device::Cpu),
        ("bf16", Device::Cpu),
        ("fp8", Device::Wgpu),
    ] {
        let f = precision(flag, device)
            .err()
            .unwrap_or_else(|| panic!("{flag} on {device}"));
        assert_eq!(f.code, 2, "{flag} on {device}: a usage error");
        let msg = format!("{:#}", f.error);
        assert!(msg.starts_with("--dtype") && msg.contains(flag), "{msg}");
    }
}

#[test]
fn version_and_help_are_not_usage_errors() {
    for args in [&["--version"][..], &["--help"], &["run", "--help"]] {
        let e = Cli::try_parse_from(std::iter::once("medpipe").chain(args.iter().copied()))
            .err()
            .unwrap();
        assert!(!e.use_stderr(), "{args:?} exits 0");
    }
}

#[test]
fn serve_defaults_to_localhost_8080_with_bounded_batches_and_queue() {
    let Command::Serve(a) = parse(&["serve"]).command else {
        panic!("not serve")
    };
    assert_eq!((a.model, a.workspace, a.variant), (None, None, None));
    assert_eq!(a.host.to_string(), "127.0.0.1");
    assert_eq!(a.port, 8080);
    assert_eq!((a.max_batch, a.max_queue, a.max_body_mb), (16, 64, 20));
    assert_eq!((a.device.as_str(), a.dtype.as_str()), ("auto", "f32"));
}

#[test]
fn serve_variant_needs_a_workspace_and_an_adapter_needs_a_model() {
    assert_eq!(
        refusal(&["serve", "--variant", "nf4"]),
        ErrorKind::MissingRequiredArgument
    );
    assert_eq!(
        refusal(&["serve", "--adapter", "a"]),
        ErrorKind::MissingRequiredArgument
    );
    assert_eq!(
        refusal(&[
            "serve",
            "--workspace",
            "w",
            "--variant",
            "nf4",
            "--model",
            "m"
        ]),
        ErrorKind::ArgumentConflict
    );
    assert_eq!(
        refusal(&["serve", "--host", "localhost:1"]),
        ErrorKind::ValueValidation
    );
}

#[test]
fn plan_defaults_to_the_configs_model_on_the_auto_device_as_a_table_without_measuring() {
    let Command::Plan(a) = parse(&["plan"]).command else {
        panic!("not plan")
    };
    assert_eq!((a.model, a.device.as_str()), (None, "auto"));
    assert!(!a.json && !a.measure);
    assert_eq!(a.cfg.workspace, PathBuf::from("."));
    let Command::Plan(a) = parse(&[
        "plan",
        "--model",
        "m",
        "--set",
        "model.max_pixels=50176",
        "--json",
        "--measure",
    ])
    .command
    else {
        panic!("not plan")
    };
    assert_eq!(a.model.as_deref(), Some("m"));
    assert_eq!(a.cfg.set, ["model.max_pixels=50176"]);
    assert!(a.json && a.measure);
}
