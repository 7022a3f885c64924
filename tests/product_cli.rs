//! The product as a user drives it: a tiny run from a config file with
//! periodic checkpoints, a legacy MLflow file store and a plot; `--print-config`;
//! `--resume`; and `generate` from the checkpoint, streaming and failing
//! clearly on a prompt outside the vocabulary.

mod common;

use common::ok;

use std::process::{Command, Output};

fn run(name: &str, args: &[&str]) -> Output {
    Command::new(common::example(name))
        .args(args)
        // MLflow is logged to only when asked for here.
        .env_remove("MLFLOW_TRACKING_URI")
        .output()
        .unwrap()
}

const TINY: &str = "[model]\nn_embd = 32\nn_head = 4\nn_layer = 2\nnum_experts = 4\n\
                    block_size = 16\n[model.router]\nkind = \"top_k\"\nbias = false\n\
                    [train]\nbatch_size = 4\neval_iters = 2\neval_interval = 4\nlog_interval = 2\n";

#[test]
fn config_checkpoints_resume_mlflow_plot_and_generate() {
    let dir = std::env::temp_dir().join(format!("moe-product-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("tiny.toml");
    std::fs::write(&config, TINY).unwrap();
    let out_dir = dir.join("run");
    let mlruns = dir.join("mlruns");
    let (cfg, out) = (config.to_str().unwrap(), out_dir.to_str().unwrap());

    // Flags override the file; the resolved config is printed.
    let printed = ok(&run(
        "shakespeare",
        &["--config", cfg, "--lr", "0.002", "--print-config"],
    ));
    assert!(
        printed.contains("n_embd = 32") && printed.contains("learning_rate = 0.002"),
        "{printed}"
    );
    assert!(printed.contains("vocab_size = 65"), "{printed}");
    // `--set` reaches any field, after the flags; a wrong path names the choices.
    let printed = ok(&run(
        "shakespeare",
        &[
            "--config",
            cfg,
            "--max-iters",
            "9",
            "--set",
            "train.max_iters=7",
            "--set",
            "model.router.norm_topk_prob=false",
            "--print-config",
        ],
    ));
    assert!(
        printed.contains("max_iters = 7") && printed.contains("norm_topk_prob = false"),
        "{printed}"
    );
    let wrong = run(
        "shakespeare",
        &[
            "--config",
            cfg,
            "--set",
            "train.max_iter=7",
            "--print-config",
        ],
    );
    let stderr = String::from_utf8_lossy(&wrong.stderr);
    assert!(
        !wrong.status.success() && stderr.contains("max_iters"),
        "{stderr}"
    );
    // The router's table; `--dispatch capacity:F` sets the strategy and the
    // router's capacity factor.
    let printed = ok(&run(
        "shakespeare",
        &[
            "--config",
            cfg,
            "--dispatch",
            "capacity:2",
            "--print-config",
        ],
    ));
    for line in [
        "[model.router]",
        "kind = \"top_k\"",
        "bias = false",
        "capacity_factor = 2.0",
        "dispatch = \"capacity\"",
    ] {
        assert!(printed.contains(line), "{line}: {printed}");
    }

    let common = [
        "--config",
        cfg,
        "--device",
        "cpu",
        "--out",
        out,
        "--sample-chars",
        "0",
    ];
    let first = [
        &common[..],
        &[
            "--max-iters",
            "6",
            "--checkpoint-interval",
            "3",
            "--plot",
            "--mlflow-file-store",
            mlruns.to_str().unwrap(),
        ],
    ]
    .concat();
    let stdout = ok(&run("shakespeare", &first));
    assert!(
        stdout.contains("tokens/s") && stdout.contains("ETA"),
        "{stdout}"
    );
    for file in [
        "model.safetensors",
        "optimizer.safetensors",
        "config.json",
        "loss_curve.png",
    ] {
        assert!(out_dir.join(file).is_file(), "{file}");
    }
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(meta["step"], 6);
    assert_eq!(meta["model"]["n_embd"], 32);
    assert_eq!(meta["model"]["router"]["kind"], "top_k");
    assert_eq!(meta["model"]["router"]["bias"], false);
    let runs: Vec<_> = std::fs::read_dir(mlruns.join("1"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .collect();
    assert_eq!(runs.len(), 1);
    let val = std::fs::read_to_string(runs[0].path().join("metrics").join("val_loss")).unwrap();
    assert_eq!(val.lines().count(), 3, "evals at steps 0, 4, 5: {val}");
    assert!(runs[0].path().join("artifacts/loss_curve.png").is_file());
    assert!(
        !out_dir.join("mlruns").exists(),
        "no file store unless asked for"
    );

    let resumed = [&common[..], &["--resume", out, "--max-iters", "8"]].concat();
    let stdout = ok(&run("shakespeare", &resumed));
    assert!(
        stdout.contains("resumed") && stdout.contains("at step 6"),
        "{stdout}"
    );
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(meta["step"], 8);

    let text = ok(&run(
        "generate",
        &[
            "--checkpoint",
            out,
            "--prompt",
            "ROMEO:",
            "--max-new-tokens",
            "40",
            "--device",
            "cpu",
        ],
    ));
    assert!(text.starts_with("ROMEO:"), "{text}");
    let text = text.strip_suffix('\n').unwrap();
    assert_eq!(text.chars().count(), "ROMEO:".len() + 40, "{text:?}");

    let bad = run(
        "generate",
        &["--checkpoint", out, "--prompt", "ROMEO€", "--device", "cpu"],
    );
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.starts_with("error: ") && stderr.contains("'€'"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
