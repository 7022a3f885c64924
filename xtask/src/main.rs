//! `cargo xtask`: the project's set-up-complete entry points.
//!
//! - `cargo xtask shakespeare [-- ARGS]`: trains the makeMoE Shakespeare model.
//! - `cargo xtask test [-- ARGS]`: runs every test of the workspace.
//! - `cargo xtask library-tests [-- ARGS]`: runs the library crates' tests
//!   again from that build (`.ci/run` does, under other CPUs' kernels).
//! - `cargo xtask env`: prints the exports that make plain `cargo` work.
//! - `cargo xtask run CARGO-ARGS...`: any cargo command in that environment.
//! - `cargo xtask hf-fixtures [-- ARGS]`: rewrites `tests/data/hf` with
//!   `scripts/hf_fixtures.py` (ARGS go to the script, e.g. `--check-ours DIR`).
//!
//! All but `hf-fixtures` first check that a build can succeed here (a C++
//! compiler; Gloo's headers, or the Debian tools that fetch them) and stop
//! with one message naming what is missing, before anything is installed
//! or cargo starts. Each then makes sure `.venv` holds PyPI's
//! `torch==2.11.0` (the libtorch that `tch 0.24` is built against),
//! creating it with `python3 -m venv` and pip when missing; `hf-fixtures` also installs `transformers==5.23.0`, the
//! reference those fixtures come from, and `test` installs `mlflow==3.17.2`,
//! the tracking server and client of the `mlflow_server` test. It has no
//! dependencies so that it builds in seconds, before libtorch exists.

use std::env;
use std::path::{Path, PathBuf};
use std::process::{exit, Command};

const TORCH_VERSION: &str = "2.11.0";
const TRANSFORMERS_VERSION: &str = "5.23.0";
/// The newest MLflow on PyPI whose `mlflow-skinny` is there too (3.18.0's
/// was not, when this was pinned).
const MLFLOW_VERSION: &str = "3.17.2";

fn main() {
    let args: Vec<String> = env::args().skip(1).collect();
    let (task, rest) = match args.split_first() {
        Some((t, r)) => (t.as_str(), strip_dashes(r)),
        None => usage(),
    };
    let root = workspace_root();
    let result = match task {
        "env" => build_env(&root).map(|vars| print_env(&vars)),
        "test" => test(&root, &rest),
        "library-tests" => library_tests(&root, &rest),
        "shakespeare" => shakespeare(&root, &rest),
        "run" => cargo(&root, &[], &rest),
        "hf-fixtures" => hf_fixtures(&root, &rest),
        _ => usage(),
    };
    if let Err(msg) = result {
        eprintln!("xtask: {msg}");
        exit(1);
    }
}

fn usage() -> ! {
    eprintln!(
        "usage: cargo xtask <shakespeare|test|env|run|hf-fixtures> [-- ARGS]\n\
         \n  shakespeare   train the makeMoE model on the bundled tinyshakespeare\
         \n                (--nproc N: N processes under torchrun, with --expert-parallel)\
         \n  test          run every test of the workspace (installs mlflow into .venv)\
         \n  library-tests run the library crates' tests again (ARGS go to each test binary)\
         \n  env           print the exports that make plain cargo find libtorch\
         \n  run ARGS      run `cargo ARGS` with that environment\
         \n  hf-fixtures   rewrite tests/data/hf with transformers (ARGS go to\
         \n                scripts/hf_fixtures.py, e.g. --check-ours DIR...)"
    );
    exit(2)
}

fn strip_dashes(rest: &[String]) -> Vec<String> {
    match rest.first() {
        Some(first) if first == "--" => rest[1..].to_vec(),
        _ => rest.to_vec(),
    }
}

/// The checkout this xtask runs for. `cargo run` sets `CARGO_MANIFEST_DIR`
/// at run time, which stays right when a built xtask is copied with its
/// target folder to another checkout; the compile-time value is the fallback.
fn workspace_root() -> PathBuf {
    let manifest = env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    manifest.parent().map(Path::to_path_buf).unwrap_or(manifest)
}

fn venv(root: &Path) -> PathBuf {
    root.join(".venv")
}

fn venv_python(root: &Path) -> PathBuf {
    venv(root).join("bin").join("python")
}

/// Returns torch's `lib` folder, installing torch into `.venv` first if needed.
fn ensure_torch(root: &Path) -> Result<PathBuf, String> {
    if let Some(lib) = torch_lib(root) {
        return Ok(lib);
    }
    let python = venv_python(root);
    if !python.exists() {
        eprintln!("xtask: creating {}", venv(root).display());
        run(Command::new("python3").args(["-m", "venv"]).arg(venv(root)))?;
    }
    eprintln!(
        "xtask: installing torch=={TORCH_VERSION} into .venv from PyPI \
         (libtorch for tch 0.24; a few GiB, once)"
    );
    pip_install(root, &format!("torch=={TORCH_VERSION}"))?;
    torch_lib(root).ok_or_else(|| {
        format!("torch=={TORCH_VERSION} was installed but `import torch` still fails in .venv")
    })
}

fn pip_install(root: &Path, requirement: &str) -> Result<(), String> {
    run(Command::new(venv_python(root))
        .args([
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            // The wheels (torch's CUDA libraries are several GiB) are not kept twice on disk.
            "--no-cache-dir",
            "--progress-bar",
            "off",
            requirement,
        ])
        // stdout is for the exports of `cargo xtask env`; pip talks on stderr.
        .stdout(std::io::stderr()))
}

/// Installs transformers into `.venv` unless it already holds that version.
fn ensure_transformers(root: &Path) -> Result<(), String> {
    if package_version(root, "transformers").as_deref() == Some(TRANSFORMERS_VERSION) {
        return Ok(());
    }
    eprintln!(
        "xtask: installing transformers=={TRANSFORMERS_VERSION} into .venv from PyPI \
         (the reference of tests/data/hf)"
    );
    pip_install(root, &format!("transformers=={TRANSFORMERS_VERSION}"))?;
    match package_version(root, "transformers") {
        Some(v) if v == TRANSFORMERS_VERSION => Ok(()),
        found => Err(format!(
            "transformers=={TRANSFORMERS_VERSION} was installed but .venv reports \
             version {found:?}"
        )),
    }
}

/// Installs MLflow (the tracking server and the client the `mlflow_server`
/// test reads runs back with) into `.venv` unless it already holds that
/// version: about 80 packages, 0.8 GB, a minute or two, once.
fn ensure_mlflow(root: &Path) -> Result<(), String> {
    if package_version(root, "mlflow").as_deref() == Some(MLFLOW_VERSION) {
        return Ok(());
    }
    eprintln!(
        "xtask: installing mlflow=={MLFLOW_VERSION} into .venv from PyPI \
         (the tracking server of the mlflow_server test; 0.8 GB, once)"
    );
    pip_install(root, &format!("mlflow=={MLFLOW_VERSION}"))?;
    match package_version(root, "mlflow") {
        Some(v) if v == MLFLOW_VERSION => Ok(()),
        found => Err(format!(
            "mlflow=={MLFLOW_VERSION} was installed but .venv reports version {found:?}"
        )),
    }
}

/// The version of an installed distribution of `.venv`, from its metadata
/// (without importing it: `import mlflow` takes seconds).
fn package_version(root: &Path, name: &str) -> Option<String> {
    let out = Command::new(venv_python(root))
        .args([
            "-c",
            "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))",
            name,
        ])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Rewrites `tests/data/hf` (or runs the script's other modes) with the
/// pinned transformers.
fn hf_fixtures(root: &Path, rest: &[String]) -> Result<(), String> {
    ensure_torch(root)?;
    ensure_transformers(root)?;
    // The script finds its files from its own path; DIRs stay relative to
    // where cargo was started.
    run(Command::new(venv_python(root))
        .arg(root.join("scripts").join("hf_fixtures.py"))
        .args(rest))
}

/// torch's `lib` folder when `.venv` holds the right torch version.
fn torch_lib(root: &Path) -> Option<PathBuf> {
    let out = Command::new(venv_python(root))
        .args([
            "-c",
            "import os, torch; print(torch.__version__.split('+')[0]); \
             print(os.path.join(os.path.dirname(torch.__file__), 'lib'))",
        ])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    let version = lines.next()?.trim();
    let lib = PathBuf::from(lines.next()?.trim());
    (version == TORCH_VERSION && lib.is_dir()).then_some(lib)
}

/// The environment under which `tch` builds and its binaries run.
fn torch_env(root: &Path, lib: &Path) -> Vec<(String, String)> {
    let venv = venv(root);
    let path = format!(
        "{}:{}",
        venv.join("bin").display(),
        env::var("PATH").unwrap_or_default()
    );
    let ld = match env::var("LD_LIBRARY_PATH") {
        Ok(old) if !old.is_empty() => format!("{}:{old}", lib.display()),
        _ => lib.display().to_string(),
    };
    vec![
        ("LIBTORCH_USE_PYTORCH".into(), "1".into()),
        ("VIRTUAL_ENV".into(), venv.display().to_string()),
        ("PATH".into(), path),
        ("LD_LIBRARY_PATH".into(), ld),
    ]
}

/// The main job: `cargo run --release --example shakespeare -- ARGS`, or,
/// with `--nproc N` among the ARGS, N processes of it launched by torchrun
/// (from `.venv`) on this machine, each joining the group.
fn shakespeare(root: &Path, rest: &[String]) -> Result<(), String> {
    let Some(at) = rest.iter().position(|a| a == "--nproc") else {
        return cargo(
            root,
            &["run", "--release", "--example", "shakespeare", "--"],
            rest,
        );
    };
    let nproc = rest
        .get(at + 1)
        .filter(|n| n.parse::<u32>().is_ok_and(|n| n >= 1))
        .ok_or("--nproc needs a number of processes >= 1")?
        .clone();
    let args: Vec<String> = rest[..at].iter().chain(&rest[at + 2..]).cloned().collect();
    cargo(
        root,
        &["build", "--release", "--example", "shakespeare"],
        &[],
    )?;
    let vars = build_env(root)?;
    let binary = root
        .join("target")
        .join("release")
        .join("examples")
        .join("shakespeare");
    let torchrun = venv(root).join("bin").join("torchrun");
    run(Command::new(torchrun)
        .args(["--no-python", "--standalone", "--nproc-per-node", &nproc])
        .arg(binary)
        .args(&args)
        .envs(vars)
        .current_dir(root))
}

/// Where Gloo's headers come from: c10d's `ProcessGroupGloo.hpp` includes
/// them and the torch wheel does not ship them.
#[derive(Debug, PartialEq)]
enum GlooSource {
    /// A folder that holds `gloo/algorithm.h` (the user's `MOE_GLOO_INCLUDE`,
    /// the copy fetched earlier into `.venv/gloo`, or `/usr/include`).
    Found(PathBuf),
    /// `MOE_GLOO_INCLUDE` set to the empty string: build without them
    /// (moe-aten then leaves c10d's process groups out).
    Disabled,
    /// Not here yet: Debian's `libgloo-dev` is to be fetched with
    /// `apt-get download` and unpacked with `dpkg-deb -x` into `.venv/gloo`.
    Fetch,
}

/// `.venv/gloo/usr/include`, where [`ensure_gloo`] unpacks Debian's package.
fn fetched_gloo(root: &Path) -> PathBuf {
    venv(root).join("gloo").join("usr").join("include")
}

fn holds_gloo(dir: &Path) -> bool {
    dir.join("gloo").join("algorithm.h").is_file()
}

/// Decides where Gloo's headers come from, without fetching anything: a
/// user-set `MOE_GLOO_INCLUDE` first (it must hold `gloo/algorithm.h`; empty
/// means none), then `.venv/gloo`, then `/usr/include` (where moe-aten's
/// build script also looks), else [`GlooSource::Fetch`], which needs
/// `apt-get` and `dpkg-deb` on PATH.
fn gloo_source(root: &Path) -> Result<GlooSource, String> {
    if let Some(dir) = env::var_os("MOE_GLOO_INCLUDE") {
        if dir.is_empty() {
            return Ok(GlooSource::Disabled);
        }
        let dir = PathBuf::from(dir);
        return if holds_gloo(&dir) {
            Ok(GlooSource::Found(dir))
        } else {
            Err(format!(
                "MOE_GLOO_INCLUDE={} holds no gloo/algorithm.h: point it at the folder \
                 that holds Gloo's `gloo/` header folder (or set it empty to build \
                 without process groups)",
                dir.display()
            ))
        };
    }
    let fetched = fetched_gloo(root);
    let system = PathBuf::from("/usr/include");
    Ok([fetched, system]
        .into_iter()
        .find(|dir| holds_gloo(dir))
        .map_or(GlooSource::Fetch, GlooSource::Found))
}

/// Returns the include folder of Gloo's headers (`None` when the user
/// turned them off with an empty `MOE_GLOO_INCLUDE`), fetching Debian's
/// `libgloo-dev` into `.venv/gloo` first if needed (`apt-get download` +
/// `dpkg-deb -x`, no root needed).
fn ensure_gloo(root: &Path) -> Result<Option<PathBuf>, String> {
    match gloo_source(root)? {
        GlooSource::Found(dir) => return Ok(Some(dir)),
        GlooSource::Disabled => {
            eprintln!(
                "xtask: MOE_GLOO_INCLUDE is empty: building without Gloo's headers, so \
                 without c10d's process groups (expert and data parallelism across \
                 processes fail at run time, and so do their tests)"
            );
            return Ok(None);
        }
        GlooSource::Fetch => {}
    }
    let dest = venv(root).join("gloo");
    let include = fetched_gloo(root);
    let debs = dest.join("deb");
    std::fs::create_dir_all(&debs).map_err(|e| format!("{}: {e}", debs.display()))?;
    eprintln!(
        "xtask: fetching Gloo's headers (Debian's libgloo-dev) into {}",
        dest.display()
    );
    let download = || {
        run(Command::new("apt-get")
            .args(["download", "libgloo-dev"])
            .current_dir(&debs)
            .stdout(std::io::stderr()))
    };
    if download().is_err() {
        // A fresh machine may not have the package lists yet.
        run(Command::new("apt-get")
            .args(["update", "-qq"])
            .stdout(std::io::stderr()))?;
        download()?;
    }
    let deb = std::fs::read_dir(&debs)
        .map_err(|e| format!("{}: {e}", debs.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or_else(|| format!("apt-get download left no .deb in {}", debs.display()))?;
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&dest))?;
    if holds_gloo(&include) {
        Ok(Some(include))
    } else {
        Err(format!("{} holds no gloo/algorithm.h", include.display()))
    }
}

/// The program a command name runs: a path as it is, a bare name looked up
/// in `path` (a PATH value), the first executable file of that name.
fn find_program(name: &str, path: Option<&std::ffi::OsStr>) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| {
        p.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if name.contains('/') {
        let p = PathBuf::from(name);
        return executable(&p).then_some(p);
    }
    env::split_paths(path?)
        .map(|dir| dir.join(name))
        .find(|p| executable(p))
}

/// What the build needs from the machine, checked before anything is
/// installed or cargo starts: a C++ compiler (torch-sys compiles tch's
/// C++ bindings, moe-aten its C++17 shim, both through the `cc` crate, which
/// runs `$CXX`, else `c++`), and either Gloo's headers or `apt-get` and
/// `dpkg-deb` to fetch them. Every problem is named in one message.
fn check_build_tools(root: &Path) -> Result<(), String> {
    let path = env::var_os("PATH");
    let path = path.as_deref();
    let mut missing = Vec::new();
    match env::var("CXX") {
        Ok(cxx) if !cxx.trim().is_empty() => {
            // CXX may carry a wrapper and flags (`ccache g++ -m64`).
            let program = cxx.split_whitespace().next().unwrap_or_default();
            if find_program(program, path).is_none() {
                missing.push(format!(
                    "a C++ compiler: CXX={cxx} but `{program}` is not an executable on PATH"
                ));
            }
        }
        _ => {
            if find_program("c++", path).is_none() {
                let hint = if find_program("g++", path).is_some() {
                    "g++ is there: set CXX=g++".to_string()
                } else if find_program("clang++", path).is_some() {
                    "clang++ is there: set CXX=clang++".to_string()
                } else {
                    "install g++ (Debian/Ubuntu: `apt-get install g++`, Fedora: \
                     `dnf install gcc-c++`) or set CXX to a C++17 compiler"
                        .to_string()
                };
                missing.push(format!(
                    "a C++ compiler: no `c++` on PATH, which the build runs to compile \
                     tch's bindings and moe-aten's C++17 shim; {hint}"
                ));
            }
        }
    }
    match gloo_source(root) {
        Err(bad_folder) => missing.push(format!("Gloo's headers: {bad_folder}")),
        Ok(GlooSource::Fetch) => {
            let absent: Vec<&str> = ["apt-get", "dpkg-deb"]
                .into_iter()
                .filter(|tool| find_program(tool, path).is_none())
                .collect();
            if !absent.is_empty() {
                missing.push(format!(
                    "Gloo's headers (c10d's process groups include them; the torch \
                     wheel lacks them): MOE_GLOO_INCLUDE is unset, neither .venv/gloo \
                     nor /usr/include holds gloo/algorithm.h, and there is no {} on \
                     PATH to fetch Debian's libgloo-dev with (Debian/Ubuntu only). Set \
                     MOE_GLOO_INCLUDE to a folder holding gloo/algorithm.h (the include \
                     folder of your distribution's Gloo headers), or set it empty \
                     (MOE_GLOO_INCLUDE=) to build without process groups",
                    absent.join(" and no ")
                ));
            }
        }
        Ok(_) => {}
    }
    if missing.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = missing.iter().map(|m| format!("\n  - {m}")).collect();
    Err(format!(
        "this machine lacks what the build needs (see README.md, \"Needs\"):{}",
        list.concat()
    ))
}

/// Everything the build needs (torch in `.venv`, Gloo's headers) and the
/// environment that points cargo at it.
fn build_env(root: &Path) -> Result<Vec<(String, String)>, String> {
    check_build_tools(root)?;
    let gloo = ensure_gloo(root)?;
    let lib = ensure_torch(root)?;
    let mut vars = torch_env(root, &lib);
    // Empty when the user turned Gloo off: moe-aten's build script then
    // compiles no process groups (and does not look in /usr/include).
    let gloo = gloo
        .map(|dir| dir.display().to_string())
        .unwrap_or_default();
    vars.push(("MOE_GLOO_INCLUDE".into(), gloo));
    Ok(vars)
}

fn print_env(vars: &[(String, String)]) {
    for (k, v) in vars {
        println!("export {k}='{v}'");
    }
}

/// The CUDA headers moe-aten's `nccl` feature compiles against that the
/// torch wheel's dependencies lack (the CUDA runtime's `crt/` and CCCL), from
/// PyPI, at the versions of torch's CUDA 13.0; installed when a command's
/// arguments name the feature.
fn ensure_nccl_headers(root: &Path, args: &[String]) -> Result<(), String> {
    if !args.iter().any(|a| a.contains("nccl")) {
        return Ok(());
    }
    let lib = ensure_torch(root)?;
    let include = lib
        .parent()
        .and_then(Path::parent)
        .map(|site| site.join("nvidia").join("cu13").join("include"))
        .ok_or("torch's lib folder has no site-packages above it")?;
    if include.join("crt").join("host_config.h").is_file() && include.join("cccl").is_dir() {
        return Ok(());
    }
    eprintln!(
        "xtask: installing nvidia-cuda-crt and nvidia-cuda-cccl (headers of the nccl feature)"
    );
    pip_install(root, "nvidia-cuda-crt==13.0.88")?;
    pip_install(root, "nvidia-cuda-cccl==13.0.85")
}

fn cargo(root: &Path, fixed: &[&str], rest: &[String]) -> Result<(), String> {
    let vars = build_env(root)?;
    ensure_nccl_headers(root, rest)?;
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root).args(fixed).args(rest).envs(vars);
    run(&mut cmd)
}

/// Every test of the workspace: unit, integration, examples and benches in
/// test mode, then doctests (the README's example among them), closing with
/// one line that totals them: `tests: N passed, M failed, K skipped`, where
/// skipped counts libtest's ignored tests (those that need a GPU among them:
/// they are `#[ignore]`d so that they are not counted as passed here).
fn test(root: &Path, rest: &[String]) -> Result<(), String> {
    // The end-to-end tests run the examples' plain binaries, which
    // `cargo test --all-targets` builds only as test harnesses.
    cargo(root, &["build", "--workspace", "--examples"], &[])?;
    ensure_mlflow(root)?;
    let mut totals = TestCounts::default();
    let mut result = cargo_counting(
        root,
        &["test", "--workspace", "--all-targets"],
        rest,
        &mut totals,
    );
    if result.is_ok() {
        result = cargo_counting(root, &["test", "--workspace", "--doc"], &[], &mut totals);
    }
    println!(
        "tests: {} passed, {} failed, {} skipped",
        totals.passed, totals.failed, totals.ignored
    );
    result
}

/// The library crates (folders under `crates/`): their tests are the ones
/// that compare numbers (dense references, transformers' fixtures,
/// makeMoE's PyTorch code, training runs against their thresholds), the
/// ones `.ci/run` runs again on other CPUs' kernels. The facade's end-to-end
/// CLI tests, MLflow and the multi-process tests check behaviour and run once.
const LIBRARY_CRATES: [&str; 10] = [
    "moe-core",
    "moe-nn",
    "moe-routers",
    "moe-experts",
    "moe-dispatch",
    "moe-block",
    "moe-models",
    "moe-data",
    "moe-hf",
    "moe-train",
];

/// The library crates' unit and integration tests, run from the build
/// `cargo xtask test` made. `cargo test -p A -p B` would resolve the
/// dependencies' features for those packages alone (libc without the
/// `extra_traits` a facade dependency turns on, and so on) and so build
/// the whole tree a second time: gigabytes, and minutes of CI. Here cargo
/// builds (or finds) the workspace-wide test binaries, and each library
/// one runs the way `cargo test` runs it, in its package's folder. `rest`
/// goes to every binary (a name filter, `--nocapture`, ...). The
/// environment (ATEN_CPU_CAPABILITY, MKL_CBWR, ...) passes through.
fn library_tests(root: &Path, rest: &[String]) -> Result<(), String> {
    use std::io::{BufRead, BufReader};
    let vars = build_env(root)?;
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(cargo);
    build
        .current_dir(root)
        .args([
            "test",
            "--workspace",
            "--tests",
            "--no-run",
            "--message-format=json-render-diagnostics",
        ])
        .envs(vars.clone())
        .stdout(std::process::Stdio::piped());
    let mut child = build
        .spawn()
        .map_err(|e| format!("cannot start cargo: {e}"))?;
    let mut binaries = Vec::new();
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if let Some(binary) = test_binary(&line) {
                binaries.push(binary);
            }
        }
    }
    let status = child.wait().map_err(|e| format!("cargo: {e}"))?;
    if !status.success() {
        return Err(format!("cargo test --no-run failed ({status})"));
    }
    let crates = root.join("crates");
    binaries.retain(|b| {
        LIBRARY_CRATES
            .iter()
            .any(|name| b.package_dir == crates.join(name))
    });
    binaries.sort_by(|a, b| (&a.package_dir, &a.path).cmp(&(&b.package_dir, &b.path)));
    if binaries.len() < LIBRARY_CRATES.len() {
        return Err(format!(
            "found {} test binaries of the library crates {LIBRARY_CRATES:?}, expected one or more each",
            binaries.len()
        ));
    }
    let mut totals = TestCounts::default();
    let mut failures = Vec::new();
    for binary in &binaries {
        println!("     Running {}", binary.path.display());
        let mut cmd = Command::new(&binary.path);
        cmd.current_dir(&binary.package_dir)
            .env("CARGO_MANIFEST_DIR", &binary.package_dir)
            .args(rest)
            .envs(vars.clone());
        if let Err(e) = run_counting(&mut cmd, &mut totals) {
            failures.push(e);
        }
    }
    println!(
        "library tests: {} passed, {} failed, {} skipped",
        totals.passed, totals.failed, totals.ignored
    );
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures.join("\n"))
    }
}

/// A test executable cargo built, and the folder of its package.
#[derive(Debug, PartialEq)]
struct TestBinary {
    path: PathBuf,
    package_dir: PathBuf,
}

/// A `compiler-artifact` line of `cargo --message-format=json` that names
/// an executable built in test mode.
fn test_binary(line: &str) -> Option<TestBinary> {
    if json_string(line, "reason")? != "compiler-artifact" || !line.contains("\"test\":true") {
        return None;
    }
    let path = PathBuf::from(json_string(line, "executable")?);
    let manifest = PathBuf::from(json_string(line, "manifest_path")?);
    Some(TestBinary {
        path,
        package_dir: manifest.parent()?.to_path_buf(),
    })
}

/// The string value of the first `"key":"..."` in a line of JSON (cargo's
/// messages are one object a line, with no spaces after the colons); `None`
/// if absent or not a string (`"executable":null`).
fn json_string(line: &str, key: &str) -> Option<String> {
    let start = line.find(&format!("\"{key}\":\""))? + key.len() + 4;
    let mut value = String::new();
    let mut chars = line[start..].chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => return Some(value),
            '\\' => match chars.next()? {
                'n' => value.push('\n'),
                't' => value.push('\t'),
                'u' => {
                    let hex: String = chars.by_ref().take(4).collect();
                    value.push(char::from_u32(u32::from_str_radix(&hex, 16).ok()?)?);
                }
                other => value.push(other),
            },
            c => value.push(c),
        }
    }
    None
}

/// Runs cargo, echoing its output and adding up libtest's
/// `test result: ... N passed; M failed; K ignored` lines into `totals`.
fn cargo_counting(
    root: &Path,
    fixed: &[&str],
    rest: &[String],
    totals: &mut TestCounts,
) -> Result<(), String> {
    let vars = build_env(root)?;
    ensure_nccl_headers(root, rest)?;
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root).args(fixed).args(rest).envs(vars);
    run_counting(&mut cmd, totals)
}

/// Runs `cmd`, echoing its standard output and adding up its libtest
/// summary lines into `totals`.
fn run_counting(cmd: &mut Command, totals: &mut TestCounts) -> Result<(), String> {
    use std::io::{BufRead, BufReader};
    cmd.stdout(std::process::Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {:?}: {e}", cmd.get_program()))?;
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            println!("{line}");
            if let Some(counts) = parse_test_result(&line) {
                totals.passed += counts.passed;
                totals.failed += counts.failed;
                totals.ignored += counts.ignored;
            }
        }
    }
    let status = child
        .wait()
        .map_err(|e| format!("{:?}: {e}", cmd.get_program()))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!(
            "{:?} {:?} failed ({status})",
            cmd.get_program(),
            cmd.get_args().collect::<Vec<_>>()
        ))
    }
}

/// Tests counted by libtest's summary lines.
#[derive(Debug, Default, PartialEq)]
struct TestCounts {
    passed: u64,
    failed: u64,
    /// `#[ignore]`d tests that did not run.
    ignored: u64,
}

/// `test result: ok. 12 passed; 0 failed; 1 ignored; ...` -> 12, 0, 1.
fn parse_test_result(line: &str) -> Option<TestCounts> {
    let rest = line.trim().strip_prefix("test result: ")?;
    let count = |word: &str| {
        rest.split(';')
            .find_map(|part| {
                part.trim()
                    .trim_start_matches("ok. ")
                    .trim_start_matches("FAILED. ")
                    .strip_suffix(word)
            })
            .and_then(|n| n.trim().parse().ok())
    };
    Some(TestCounts {
        passed: count(" passed")?,
        failed: count(" failed")?,
        // Every libtest summary has it; 0 if a future one does not.
        ignored: count(" ignored").unwrap_or(0),
    })
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let status = cmd
        .status()
        .map_err(|e| format!("cannot start {:?}: {e}", cmd.get_program()))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!(
            "{:?} {:?} failed ({status})",
            cmd.get_program(),
            cmd.get_args().collect::<Vec<_>>()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::{find_program, parse_test_result, test_binary, TestBinary, TestCounts};
    use std::path::PathBuf;

    #[test]
    fn reads_test_binaries_from_cargo_messages() {
        let test = r#"{"reason":"compiler-artifact","package_id":"path+file:///w/crates/moe-core#moe-layers-core@0.1.0","manifest_path":"/w/crates/moe-core/Cargo.toml","target":{"kind":["lib"],"name":"moe_core","src_path":"/w/crates/moe-core/src/lib.rs","test":true},"profile":{"opt_level":"1","test":true},"features":[],"filenames":["/w/target/debug/deps/moe_core-1"],"executable":"/w/target/debug/deps/moe_core-1","fresh":true}"#;
        assert_eq!(
            test_binary(test),
            Some(TestBinary {
                path: PathBuf::from("/w/target/debug/deps/moe_core-1"),
                package_dir: PathBuf::from("/w/crates/moe-core"),
            })
        );
        let library = r#"{"reason":"compiler-artifact","manifest_path":"/w/crates/moe-core/Cargo.toml","profile":{"test":false},"executable":null,"fresh":true}"#;
        assert_eq!(test_binary(library), None);
        let escaped = r#"{"reason":"compiler-artifact","manifest_path":"/w/a \"b\"/Cargo.toml","profile":{"test":true},"executable":"/w/t\u00e9st"}"#;
        assert_eq!(
            test_binary(escaped),
            Some(TestBinary {
                path: PathBuf::from("/w/t\u{e9}st"),
                package_dir: PathBuf::from("/w/a \"b\""),
            })
        );
        let other = r#"{"reason":"build-finished","success":true}"#;
        assert_eq!(test_binary(other), None);
    }

    #[test]
    fn reads_libtest_summaries() {
        let ok = "test result: ok. 12 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.09s";
        let counts = |passed, failed, ignored| {
            Some(TestCounts {
                passed,
                failed,
                ignored,
            })
        };
        assert_eq!(parse_test_result(ok), counts(12, 0, 1));
        let bad = "test result: FAILED. 1 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out";
        assert_eq!(parse_test_result(bad), counts(1, 2, 0));
        let gpu = "test result: ok. 0 passed; 0 failed; 2 ignored; 0 measured; 0 filtered out; finished in 0.00s";
        assert_eq!(parse_test_result(gpu), counts(0, 0, 2));
        assert_eq!(parse_test_result("running 3 tests"), None);
        assert_eq!(
            parse_test_result("test result: ok. 3 passed; 0 failed"),
            counts(3, 0, 0)
        );
    }

    #[test]
    fn finds_programs_on_a_path() {
        let dir = std::env::temp_dir().join(format!("xtask-path-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let tool = dir.join("tool");
        std::fs::write(&tool, "#!/bin/sh\n").unwrap();
        let plain = dir.join("plain");
        std::fs::write(&plain, "not executable").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path =
            std::env::join_paths(["/nonexistent-xtask-dir".as_ref(), dir.as_path()]).unwrap();
        assert_eq!(find_program("tool", Some(&path)), Some(tool.clone()));
        assert_eq!(find_program("plain", Some(&path)), None);
        assert_eq!(find_program("tool", None), None);
        assert_eq!(find_program(tool.to_str().unwrap(), None), Some(tool));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
