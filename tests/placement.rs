//! Where the proxy's threads run (`xks_hsm::lanes`), read from outside as an
//! operator would: `/proc/PID/task/*/status` of the real process. With
//! `pin_threads` (the default) the one runtime worker sits on one CPU and
//! the HSM thread that serves a quiet proxy's requests on the same one; with
//! `pin_threads = false` no thread is pinned. On a machine (or under a CPU
//! quota) with a single CPU there is nothing to pin, and the first test
//! only checks that.

mod common;

use common::audit::encrypt_n;
use common::*;

/// Each thread of `pid`: its name and its `Cpus_allowed_list` ("1", "0-1").
fn threads(pid: u32) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().path();
        let (Ok(name), Ok(status)) = (
            std::fs::read_to_string(task.join("comm")),
            std::fs::read_to_string(task.join("status")),
        ) else {
            continue; // the thread ended meanwhile
        };
        let cpus = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .unwrap()
            .trim()
            .to_string();
        out.push((name.trim().to_string(), cpus));
    }
    out
}

/// This test process's own CPUs, which the proxy inherits.
fn own_cpus() -> String {
    threads(std::process::id())
        .into_iter()
        .next()
        .map(|(_, cpus)| cpus)
        .unwrap()
}

fn single_cpu(list: &str) -> bool {
    !list.contains(',') && !list.contains('-')
}

#[test]
fn a_quiet_proxy_keeps_its_worker_and_hsm_thread_on_one_cpu() {
    let p = Proxy::start();
    assert!(
        p.wait_for_log("threads placed"),
        "no placement line:\n{}",
        p.log()
    );
    // A few requests one after another: a quiet pool, so each job goes to
    // the HSM thread on the worker's own CPU, which pins itself there.
    encrypt_n(&p, 20);
    let threads = threads(p.pid());
    let cpus = own_cpus();
    let quota = std::thread::available_parallelism().map_or(1, |n| n.get());
    let lanes = if single_cpu(&cpus) {
        1
    } else {
        // "0-1" or "0,2-3": count them the simple way.
        cpus.split(',')
            .map(|r| match r.split_once('-') {
                Some((a, b)) => b.parse::<usize>().unwrap() - a.parse::<usize>().unwrap() + 1,
                None => 1,
            })
            .sum()
    };
    if lanes < 2 || quota < lanes {
        // Nothing to pin: every thread keeps the process's CPUs.
        assert!(threads.iter().all(|(_, c)| *c == cpus), "{threads:?}");
        return;
    }
    let workers: Vec<&String> = threads
        .iter()
        .filter(|(n, c)| n == "xks-rt" && single_cpu(c))
        .map(|(_, c)| c)
        .collect();
    assert_eq!(workers.len(), 1, "one pinned runtime worker: {threads:?}");
    let hsm_pinned: Vec<&String> = threads
        .iter()
        .filter(|(n, c)| n.starts_with("hsm-0-") && !n.ends_with("ctl") && single_cpu(c))
        .map(|(_, c)| c)
        .collect();
    assert!(
        hsm_pinned.contains(&workers[0]),
        "an HSM thread on the worker's CPU {}: {threads:?}",
        workers[0]
    );
    // Blocking-pool threads, the log writer and the control thread are not
    // pinned.
    for (name, c) in &threads {
        if name == "xks-log" || name.ends_with("-ctl") {
            assert_eq!(*c, cpus, "{name} is not pinned: {threads:?}");
        }
    }
}

#[test]
fn pin_threads_false_pins_nothing() {
    let p = Proxy::start_with(Options {
        extra_server: "pin_threads = false\nruntime_threads = 2".into(),
        ..Options::default()
    });
    encrypt_n(&p, 20);
    let cpus = own_cpus();
    let threads = threads(p.pid());
    assert!(threads.iter().all(|(_, c)| *c == cpus), "{threads:?}");
    assert!(
        p.wait_for_log("\"runtime_workers\":2"),
        "no placement line:\n{}",
        p.log()
    );
}
