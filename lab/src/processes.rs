//! Training runs in child processes. A program that trains several runs
//! (router designs, trials of a search) re-runs itself once per run, with a
//! flag that selects the run: processes rather than threads because each
//! run re-seeds libtorch's global generator at every step, and a run that
//! crashes or runs out of memory takes only its own process down. The
//! child prints its result as a last `RESULT {json}` line
//! ([`print_result`]); the parent keeps up to `jobs` children running in a
//! [`ProcessPool`] and reads each result as its child exits
//! ([`ProcessPool::wait_any`]). On a small CPU, one libtorch thread per run
//! beats several threads per run ([`threads_per_run`]); on a GPU the step
//! is bound by host-side launches, so runs in parallel processes fill the
//! device.

use moe_layers::{MoeError, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::HashMap;
use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver, Sender};

/// The start of the line that carries a child's result.
pub const RESULT_PREFIX: &str = "RESULT ";

/// Prints `result` as the `RESULT {json}` line the parent reads; a child
/// prints it last, on stdout.
pub fn print_result<T: Serialize>(result: &T) -> Result<()> {
    let line = serde_json::to_string(result)
        .map_err(|e| MoeError::Data(format!("cannot serialise a result: {e}")))?;
    println!("{RESULT_PREFIX}{line}");
    Ok(())
}

/// libtorch threads for each of `jobs` runs at once: `threads` when
/// positive; else libtorch's default for a single job (`None`: leave it)
/// and that default divided by `jobs` (at least 1) for several.
pub fn threads_per_run(threads: i32, jobs: usize) -> Option<i32> {
    match (threads, jobs) {
        (t, _) if t > 0 => Some(t),
        (_, 0 | 1) => None,
        (_, jobs) => Some((tch::get_num_threads() / jobs as i32).max(1)),
    }
}

/// A finished child: its run's key, its result and what else it printed.
#[derive(Debug)]
pub struct Finished<K, T> {
    /// The key the run was started under.
    pub key: K,
    /// The result the child printed on its `RESULT` line.
    pub result: T,
    /// The child's stdout without its result line (each line with its `\n`).
    pub output: String,
}

struct Running<K> {
    key: K,
    name: String,
    child: Child,
}

/// Child processes, at most `jobs` of them at once. Each child's stdout is
/// read by a thread of its own (so that a chatty child never blocks on a
/// full pipe); stderr is inherited, so progress lines reach the terminal
/// as they come. Children still running when the pool is dropped (the
/// parent gave up on an error) are killed.
pub struct ProcessPool<K> {
    jobs: usize,
    next: u64,
    running: HashMap<u64, Running<K>>,
    sender: Sender<(u64, std::io::Result<String>)>,
    receiver: Receiver<(u64, std::io::Result<String>)>,
}

impl<K> ProcessPool<K> {
    /// A pool that runs up to `jobs` children at once (at least one).
    pub fn new(jobs: usize) -> Self {
        let (sender, receiver) = channel();
        ProcessPool {
            jobs: jobs.max(1),
            next: 0,
            running: HashMap::new(),
            sender,
            receiver,
        }
    }

    /// How many children may run at once.
    pub fn jobs(&self) -> usize {
        self.jobs
    }

    /// How many children are running.
    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// Whether `jobs` children are running (the next must wait).
    pub fn is_full(&self) -> bool {
        self.running.len() >= self.jobs
    }

    /// The keys of the running children.
    pub fn keys(&self) -> impl Iterator<Item = &K> {
        self.running.values().map(|r| &r.key)
    }

    /// Starts `command` (its stdout captured, stderr inherited) as the run
    /// `key`; `name` names the run in errors. An error if the pool is full
    /// or the program cannot start.
    pub fn spawn(&mut self, key: K, name: impl Into<String>, mut command: Command) -> Result<()> {
        let name = name.into();
        if self.is_full() {
            return Err(MoeError::config(format!(
                "cannot start {name}: {} runs are already running",
                self.jobs
            )));
        }
        let mut child = command
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| MoeError::Data(format!("cannot start {name}: {e}")))?;
        let mut stdout = child.stdout.take().expect("stdout is piped");
        let (id, sender) = (self.next, self.sender.clone());
        self.next += 1;
        std::thread::spawn(move || {
            let mut text = String::new();
            let read = stdout.read_to_string(&mut text).map(|_| text);
            // The receiver is gone only when the pool was dropped.
            let _ = sender.send((id, read));
        });
        self.running.insert(id, Running { key, name, child });
        Ok(())
    }

    /// Waits for whichever child finishes first and returns its result; an
    /// error naming the run if it failed or printed no parseable result
    /// (the other children keep running), or if none is running.
    pub fn wait_any<T: DeserializeOwned>(&mut self) -> Result<Finished<K, T>> {
        if self.running.is_empty() {
            return Err(MoeError::config("no run is running"));
        }
        // The pool holds a sender, so this waits until a reader thread sends.
        let (id, read) = self.receiver.recv().expect("the pool holds a sender");
        let Running {
            key,
            name,
            mut child,
        } = self.running.remove(&id).expect("a running child");
        let status = child
            .wait()
            .map_err(|e| MoeError::Data(format!("{name} was lost: {e}")))?;
        let stdout =
            read.map_err(|e| MoeError::Data(format!("cannot read {name}'s output: {e}")))?;
        let mut output = String::new();
        let mut line = None;
        for l in stdout.lines() {
            match l.strip_prefix(RESULT_PREFIX) {
                Some(json) => line = Some(json),
                None => {
                    output.push_str(l);
                    output.push('\n');
                }
            }
        }
        match (status.success(), line) {
            (true, Some(json)) => {
                let result = serde_json::from_str(json).map_err(|e| {
                    MoeError::Data(format!("{name} printed a bad result ({e}): {json}"))
                })?;
                Ok(Finished {
                    key,
                    result,
                    output,
                })
            }
            (true, None) => Err(MoeError::Data(format!(
                "{name} printed no `{RESULT_PREFIX}` line"
            ))),
            (false, _) => Err(MoeError::Data(format!("{name} failed ({status})"))),
        }
    }
}

impl<K> Drop for ProcessPool<K> {
    fn drop(&mut self) {
        for run in self.running.values_mut() {
            let _ = run.child.kill();
            let _ = run.child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", script]);
        cmd
    }

    #[test]
    fn results_come_back_as_children_finish() {
        let mut pool = ProcessPool::new(2);
        pool.spawn(
            "slow",
            "slow run",
            sh("sleep 0.5; echo hello; echo 'RESULT 2'"),
        )
        .unwrap();
        pool.spawn("fast", "fast run", sh("echo 'RESULT 1'"))
            .unwrap();
        assert!(pool.is_full());
        assert!(pool.spawn("third", "third", sh("true")).is_err());
        let first: Finished<&str, i64> = pool.wait_any().unwrap();
        assert_eq!((first.key, first.result), ("fast", 1));
        let second: Finished<&str, i64> = pool.wait_any().unwrap();
        assert_eq!(
            (second.key, second.result, second.output.as_str()),
            ("slow", 2, "hello\n")
        );
        assert_eq!(pool.running(), 0);
        assert!(pool.wait_any::<i64>().is_err());
    }

    #[test]
    fn a_failed_or_silent_child_is_an_error_naming_it() {
        let mut pool = ProcessPool::new(1);
        pool.spawn((), "run 3:1337", sh("exit 3")).unwrap();
        let err = pool.wait_any::<i64>().unwrap_err().to_string();
        assert!(err.contains("run 3:1337 failed"), "{err}");
        pool.spawn((), "quiet run", sh("echo nothing")).unwrap();
        let err = pool.wait_any::<i64>().unwrap_err().to_string();
        assert!(err.contains("quiet run printed no"), "{err}");
    }

    #[test]
    fn threads_are_split_between_jobs() {
        assert_eq!(threads_per_run(3, 1), Some(3));
        assert_eq!(threads_per_run(0, 1), None);
        let all = tch::get_num_threads();
        assert_eq!(threads_per_run(0, 2), Some((all / 2).max(1)));
    }
}
