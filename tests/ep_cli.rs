//! Expert parallelism across real processes: torchrun launches two ranks
//! of the shakespeare example on 127.0.0.1 (Gloo); their 20 steps equal,
//! loss by loss, one process training on the same global batches
//! (`--simulate-ranks 2`), and their checkpoint is one that a single process
//! loads. Experts that do not split over the ranks are an error. The
//! parameter count each run prints is the whole model's, every process's
//! experts included, with the active count per token from it.

mod common;

use common::ok;
use moe_layers::lm::{load_checkpoint, LmConfig};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// torchrun of the environment's torch (`cargo xtask` puts `.venv` first).
fn torchrun() -> PathBuf {
    let venv = std::env::var_os("VIRTUAL_ENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv"));
    let path = venv.join("bin").join("torchrun");
    assert!(path.is_file(), "{} is missing", path.display());
    path
}

const CONFIG: &str = r#"
[model]
family = "decoder"
hidden_size = 32
intermediate_size = 32
num_hidden_layers = 2
num_attention_heads = 4
num_key_value_heads = 2
max_position_embeddings = 16
num_local_experts = 4
num_experts_per_tok = 2
router_aux_loss_coef = 0.01
[train]
batch_size = 4
max_iters = 20
eval_interval = 10
eval_iters = 2
log_interval = 1
grad_clip = 1.0
"#;

/// The step losses of `dir/metrics.jsonl`.
fn step_losses(dir: &Path) -> Vec<f64> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["event"] == "step")
        .map(|v| v["loss"].as_f64().unwrap())
        .collect()
}

fn shakespeare(args: &[&str], config: &Path, out: &Path) -> Command {
    let mut cmd = Command::new(common::example("shakespeare"));
    cmd.args(args)
        .args(["--device", "cpu", "--sample-chars", "0", "--config"])
        .arg(config)
        .arg("--out")
        .arg(out)
        .env("OMP_NUM_THREADS", "1");
    cmd
}

/// The `start` record of `dir/metrics.jsonl`.
fn start_record(dir: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let first = text.lines().next().unwrap();
    let record: serde_json::Value = serde_json::from_str(first).unwrap();
    assert_eq!(record["event"], "start", "{record}");
    record
}

/// The printed `"{total} M parameters ({active} M active per token)"`, in millions.
fn printed_counts(stdout: &str) -> (f64, f64) {
    let line = stdout
        .lines()
        .find(|l| l.contains(" M parameters ("))
        .unwrap_or_else(|| panic!("no parameter count in:\n{stdout}"));
    let total = line.split(" M parameters (").next().unwrap();
    let active = line
        .split(" M parameters (")
        .nth(1)
        .and_then(|rest| rest.split(" M active per token").next())
        .unwrap();
    (
        total.trim().parse().unwrap(),
        active.trim().parse().unwrap(),
    )
}

fn torchrun_shakespeare(nproc: &str, config: Option<&Path>, out: &Path) -> Command {
    let mut cmd = Command::new(torchrun());
    cmd.args(["--no-python", "--standalone", "--nproc-per-node", nproc])
        .arg(common::example("shakespeare"))
        .args([
            "--expert-parallel",
            "--device",
            "cpu",
            "--sample-chars",
            "0",
        ])
        .arg("--out")
        .arg(out)
        .env("OMP_NUM_THREADS", "1");
    if let Some(config) = config {
        cmd.arg("--config").arg(config);
    }
    cmd
}

#[test]
fn two_processes_train_as_one_on_the_same_global_batches() {
    let dir = std::env::temp_dir().join(format!("moe-ep-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("run.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let (one, two) = (dir.join("one"), dir.join("two"));
    ok(&shakespeare(&["--simulate-ranks", "2"], &config, &one)
        .output()
        .unwrap());
    let out = ok(&torchrun_shakespeare("2", Some(&config), &two)
        .output()
        .unwrap());
    assert!(out.contains("saved"), "{out}");
    // The whole model's parameter count, not rank 0's share of the experts.
    let (single, parallel) = (start_record(&one), start_record(&two));
    for key in ["parameters", "active_parameters"] {
        assert_eq!(parallel[key], single[key], "{key}");
    }
    let (total, active) = printed_counts(&out);
    assert_eq!(total, single["parameters"].as_f64().unwrap() / 1e6, "{out}");
    assert!(active > 0.0 && active < total, "{out}");
    let (want, got) = (step_losses(&one), step_losses(&two));
    assert_eq!(got.len(), 20, "{got:?}");
    let worst = want
        .iter()
        .zip(&got)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f64, f64::max);
    println!("2 processes vs one: max |loss difference| over 20 steps {worst:e}");
    assert!(worst < 1e-4, "{want:?}\n{got:?}");
    // One checkpoint with the whole model, which a single process loads.
    let loaded = load_checkpoint(&two, tch::Device::Cpu).unwrap();
    assert_eq!(loaded.meta.step, 20);
    let bank = loaded.vs.variables()["model.layers.0.mlp.experts.w_in"].size();
    assert_eq!(bank[0], 4, "every expert: {bank:?}");
    for rank in 0..2 {
        assert!(two
            .join(format!("optimizer.rank{rank}.safetensors"))
            .is_file());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn experts_that_do_not_split_over_the_processes_are_an_error() {
    let dir = std::env::temp_dir().join(format!("moe-ep-cli-bad-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("run.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let start = Instant::now();
    let out = torchrun_shakespeare("3", Some(&config), &dir.join("run"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("4 experts over 3 ranks"), "{stderr}");
    assert!(
        start.elapsed() < Duration::from_secs(120),
        "{:?}",
        start.elapsed()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// makeMoE's Shakespeare model (8 experts per layer) over two processes
/// prints the count one process prints (`tests/shakespeare_cli.rs`):
/// 8.996545 M, with a positive active count per token computed from it.
#[test]
fn the_parameter_count_is_the_whole_models_over_every_process() {
    let dir = std::env::temp_dir().join(format!("moe-ep-cli-count-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let out = ok(&torchrun_shakespeare("2", None, &dir.join("run"))
        .args(["--max-iters", "1", "--eval-iters", "1"])
        .output()
        .unwrap());
    assert!(out.contains("8.996545 M parameters"), "{out}");
    let record = start_record(&dir.join("run"));
    assert_eq!(record["parameters"], 8_996_545);
    assert_eq!(record["model"]["family"], "make_moe");
    // The active count is the config's formula applied to the whole model.
    let config: LmConfig = serde_json::from_value(record["model"].clone()).unwrap();
    let active = config.active_params(8_996_545).unwrap();
    assert_eq!(record["active_parameters"], active);
    assert!(0 < active && active < 8_996_545, "{active}");
    let (total, printed_active) = printed_counts(&out);
    assert_eq!(total, 8.996545);
    assert_eq!(
        format!("{printed_active:.3}"),
        format!("{:.3}", active as f64 / 1e6)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
