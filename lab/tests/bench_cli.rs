//! The measuring programs as a user runs them, at toy sizes: `compare_routers`
//! with its runs in parallel processes, and `train_bench` timing makeMoE's own
//! PyTorch step side by side with ours.

mod common;

use common::ok;

use std::path::PathBuf;
use std::process::Command;

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("moe-bench-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn compare_routers_runs_in_parallel_processes_and_merges_their_results() {
    let dir = temp_dir("routers");
    let (table, metrics) = (dir.join("routers.md"), dir.join("runs.jsonl"));
    std::fs::write(&table, "# Routers\n\nhand-written text\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_compare_routers"))
        .args(["--max-iters", "2", "--seeds", "2", "--eval-iters", "1"])
        .args(["--jobs", "3", "--threads", "1", "--device", "cpu"])
        .arg("--out")
        .arg(&table)
        .arg("--metrics")
        .arg(&metrics)
        .output()
        .unwrap();
    let stdout = ok(&out);
    assert!(
        !stdout.contains("RESULT "),
        "children's results leaked: {stdout}"
    );

    let md = std::fs::read_to_string(&table).unwrap();
    assert!(md.starts_with("# Routers\n\nhand-written text\n"), "{md}");
    assert!(
        md.contains("--max-iters 2 --seeds 2 --eval-iters 1 --jobs 3 --threads 1"),
        "{md}"
    );
    let rows: Vec<&str> = md
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| design"))
        .collect();
    assert_eq!(rows.len(), 7, "one row per design: {md}");
    for row in &rows {
        let val: f64 = row.split('|').nth(3).unwrap().trim().parse().unwrap();
        assert!(
            val.is_finite() && val > 1.0 && val < 10.0,
            "val loss {val} in {row}"
        );
    }

    // Every (design, seed) run reported its evaluations into one file, and
    // no per-run part is left behind.
    let text = std::fs::read_to_string(&metrics).unwrap();
    let mut runs: Vec<(String, i64)> = text
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["design"].as_str().unwrap().to_string(),
                v["seed"].as_i64().unwrap(),
            )
        })
        .collect();
    runs.dedup();
    assert_eq!(runs.len(), 14, "{text}");
    let leftovers = std::fs::read_dir(&dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .to_string_lossy()
                .ends_with(".part")
        })
        .count();
    assert_eq!(leftovers, 0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn train_bench_times_makemoe_pytorch_side_by_side() {
    // `cargo xtask test` runs the tests with .venv active, whose torch is
    // the libtorch these binaries link.
    let python = match std::env::var_os("VIRTUAL_ENV") {
        Some(venv) => PathBuf::from(venv).join("bin").join("python"),
        None => PathBuf::from("python3"),
    };
    // One thread for ours and for makeMoE's child process: this test runs
    // beside the parallel compare_routers runs, and libtorch's OpenMP
    // threads stall badly when a 2-core machine is oversubscribed.
    let out = Command::new(env!("CARGO_BIN_EXE_train_bench"))
        .env("OMP_NUM_THREADS", "1")
        .args(["--device", "cpu", "--steps", "2", "--eval-iters", "0"])
        .args(["--dispatch", "auto", "--versus-makemoe", "--rounds", "2"])
        .arg("--python")
        .arg(&python)
        .output()
        .unwrap();
    let stdout = ok(&out);
    let line = stdout.lines().last().unwrap();
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(v["versus"], "makemoe-pytorch");
    assert_eq!(v["ours_ms_per_step"].as_array().unwrap().len(), 2, "{line}");
    assert_eq!(
        v["makemoe_ms_per_step"].as_array().unwrap().len(),
        2,
        "{line}"
    );
    let (ours, theirs) = (
        v["ours_median_ms"].as_f64().unwrap(),
        v["makemoe_median_ms"].as_f64().unwrap(),
    );
    assert!(ours > 0.0 && theirs > 0.0, "{line}");
    assert!(
        (v["ratio"].as_f64().unwrap() - ours / theirs).abs() < 1e-9,
        "{line}"
    );

    // Only the makeMoE preset is comparable with makeMoE's code.
    let out = Command::new(env!("CARGO_BIN_EXE_train_bench"))
        .args([
            "--device",
            "cpu",
            "--steps",
            "1",
            "--eval-iters",
            "0",
            "--preset",
            "default",
        ])
        .args(["--dispatch", "auto", "--versus-makemoe"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("needs --preset makemoe"), "{stderr}");
}
