//! The `shakespeare` example as a user runs it: a short real run writes the
//! promised files, and each bad input exits non-zero with one readable line
//! (a flag's value outside its list: clap's error, which lists the values).

mod common;

use std::path::PathBuf;
use std::process::{Command, Output};

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("moe-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn run(args: &[&str]) -> Output {
    Command::new(common::example("shakespeare"))
        .args(args)
        .output()
        .unwrap()
}

fn assert_one_line_error(out: &Output, needle: &str) {
    assert!(!out.status.success(), "expected failure, got success");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line, got:\n{stderr}");
    assert!(
        lines[0].starts_with("error: ") && lines[0].contains(needle),
        "{stderr}"
    );
}

#[test]
fn a_short_run_writes_metrics_checkpoint_and_a_sample() {
    let out_dir = temp_dir("ok");
    let out = run(&[
        "--max-iters",
        "20",
        "--eval-interval",
        "10",
        "--eval-iters",
        "2",
        "--sample-chars",
        "30",
        "--device",
        "cpu",
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("8.996545 M parameters"), "{stdout}");
    assert!(
        stdout.contains("tokens/s") && stdout.contains("ETA"),
        "{stdout}"
    );

    let metrics = std::fs::read_to_string(out_dir.join("metrics.jsonl")).unwrap();
    let records: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records[0]["event"], "start");
    assert_eq!(records[0]["parameters"], 8_996_545);
    assert_eq!(records[0]["model"]["n_layer"], 8);
    assert_eq!(records[0]["model"]["family"], "make_moe");
    let evals: Vec<&serde_json::Value> = records.iter().filter(|r| r["event"] == "eval").collect();
    assert_eq!(
        evals
            .iter()
            .map(|r| r["step"].as_i64().unwrap())
            .collect::<Vec<_>>(),
        vec![0, 10, 19]
    );
    for key in [
        "train_loss",
        "val_loss",
        "ms_per_step",
        "tokens_per_s",
        "load_cv",
    ] {
        assert!(evals[2][key].as_f64().unwrap() > 0.0, "{key}");
    }
    // One routing record per layer: 8 experts' loads summing to N k.
    let routing = evals[2]["routing"].as_array().unwrap();
    assert_eq!(routing.len(), 8);
    let loads = routing[0]["tokens_per_expert"].as_array().unwrap();
    assert_eq!(loads.len(), 8);
    assert_eq!(records.last().unwrap()["event"], "end");
    assert!(records
        .iter()
        .any(|r| r["event"] == "step" && r["lr"] == 1e-3));
    assert!(out_dir.join("model.safetensors").is_file());
    assert!(out_dir.join("config.json").is_file());
    let sample = stdout.split("--- sample ---\n").nth(1).unwrap();
    let sample = sample.split("\n--------------").next().unwrap();
    assert_eq!(sample.chars().count(), 30, "{sample:?}");
    let _ = std::fs::remove_dir_all(&out_dir);
}

#[test]
fn bad_inputs_exit_with_one_readable_line() {
    let out_dir = temp_dir("bad");
    let out_s = out_dir.to_str().unwrap();
    let missing = run(&["--data", "/nonexistent/corpus.txt", "--out", out_s]);
    assert_one_line_error(&missing, "/nonexistent/corpus.txt");

    let short = out_dir.with_extension("short.txt");
    std::fs::write(&short, "To be, or not to be").unwrap();
    let too_short = run(&["--data", short.to_str().unwrap(), "--out", out_s]);
    assert_one_line_error(&too_short, "block_size + 1");

    // An enum flag's bad value is clap's error, which lists the values.
    let tpu = run(&["--device", "tpu", "--out", out_s]);
    assert_eq!(tpu.status.code(), Some(2), "clap's usage error");
    let stderr = String::from_utf8_lossy(&tpu.stderr);
    assert!(
        stderr.starts_with("error: invalid value 'tpu' for '--device <DEVICE>'")
            && stderr.contains("[possible values: auto, cpu, cuda]"),
        "{stderr}"
    );
    if !tch_cuda_available() {
        assert_one_line_error(&run(&["--device", "cuda", "--out", out_s]), "cuda");
    }

    let file_not_dir = out_dir.with_extension("file");
    std::fs::write(&file_not_dir, "").unwrap();
    let unwritable = run(&[
        "--out",
        file_not_dir.join("sub").to_str().unwrap(),
        "--max-iters",
        "1",
    ]);
    assert_one_line_error(&unwritable, "sub");
    let _ = std::fs::remove_file(short);
    let _ = std::fs::remove_file(file_not_dir);
}

fn tch_cuda_available() -> bool {
    tch::Cuda::is_available()
}

#[test]
fn the_decoder_family_trains_checkpoints_and_resumes_through_the_same_cli() {
    let out_dir = temp_dir("decoder");
    let out_s = out_dir.to_str().unwrap();
    // Yuan 2.0-M32's design (localized filtering, attention router) at a
    // test's size.
    let config_path = out_dir.with_extension("toml");
    std::fs::write(
        &config_path,
        "[model]\nfamily = \"decoder\"\nhidden_size = 32\nnum_hidden_layers = 2\n\
         num_attention_heads = 4\nnum_key_value_heads = 2\nintermediate_size = 32\n\
         localized_filtering = true\n[model.router]\nkind = \"attention\"\nbias = false\n",
    )
    .unwrap();
    let common_args = [
        "--config",
        config_path.to_str().unwrap(),
        "--batch-size",
        "4",
        "--eval-interval",
        "3",
        "--eval-iters",
        "2",
        "--sample-chars",
        "10",
        "--device",
        "cpu",
        "--out",
        out_s,
    ];
    let first = run(&[&common_args[..], &["--max-iters", "3"]].concat());
    let stdout = String::from_utf8_lossy(&first.stdout);
    assert!(
        first.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["model"]["family"], "decoder");
    assert_eq!(config["model"]["localized_filtering"], true);
    assert_eq!(config["model"]["router"]["kind"], "attention");
    assert_eq!(config["step"], 3);

    let resumed = run(&[&common_args[..], &["--max-iters", "6", "--resume", out_s]].concat());
    let stdout = String::from_utf8_lossy(&resumed.stdout);
    assert!(
        resumed.status.success() && stdout.contains("at step 3"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    let metrics = std::fs::read_to_string(out_dir.join("metrics.jsonl")).unwrap();
    let steps: Vec<i64> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["event"] == "eval")
        .map(|r| r["step"].as_i64().unwrap())
        .collect();
    assert_eq!(steps, vec![0, 2, 3, 5], "evaluations of both runs");
    let _ = std::fs::remove_dir_all(&out_dir);
    let _ = std::fs::remove_file(&config_path);
}
