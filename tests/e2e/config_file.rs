//! The config file is applied whole or not at all: torn in-place writes, empty and
//! `node:`-only files, while a client connects to a service the torn file would drop.

use std::io::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Result};

use crate::world::World;

/// Three services; the client talks to the third, which a file cut after the first
/// service would remove.
fn three_services() -> String {
    let mut yaml = String::from("services:\n");
    for n in 1..=3 {
        yaml.push_str(&format!(
            "  - name: svc{n}\n    vips: [127.210.20.{n}]\n    ports: [{{number: 80, targetPort: 8080}}]\n    healthCheck: {{disabled: true}}\n    endpoints: [{{address: 127.10.20.{n}}}]\n"
        ));
    }
    yaml
}

/// Rewrites `path` in place as `cat > file` or an editor does: truncate, write `head`,
/// pause, write `tail`. With `reopen`, the writer closes the file after `head` and
/// appends `tail` from a second open, as a shell's `>` then `>>` does.
fn write_in_place(
    path: &Path,
    head: &str,
    tail: &str,
    pause: Duration,
    reopen: bool,
) -> Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)?;
    file.write_all(head.as_bytes())?;
    file.flush()?;
    if reopen {
        drop(file);
        std::thread::sleep(pause);
        let mut file = std::fs::OpenOptions::new().append(true).open(path)?;
        file.write_all(tail.as_bytes())?;
    } else {
        std::thread::sleep(pause);
        file.write_all(tail.as_bytes())?;
    }
    Ok(())
}

fn service_count(w: &mut World) -> Result<usize> {
    let services = w.agent().services_json()?;
    let mut names: Vec<String> = services
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names.dedup();
    Ok(names.len())
}

#[test]
fn a_config_file_torn_by_an_in_place_writer_is_never_applied() -> Result<()> {
    let mut w = World::new()?;
    for n in 1..=3 {
        w.backend(&format!("b{n}"), &format!("127.10.20.{n}:8080"))?;
    }
    let full = three_services();
    w.write_config(&full)?;
    w.start_agent()?;
    ensure!(service_count(&mut w)? == 3);
    let path = w.config_path();
    let cut = full.find("  - name: svc2").expect("second service");
    let (head, tail) = full.split_at(cut);

    let (child, stop) = w.connect_loop("127.210.20.3:80")?;
    // 700 ms is longer than the settle time (200 ms): a writer holding the file open is
    // never read mid-write, however long it pauses. The last round pauses past the
    // removal hold (5 s) too.
    let pauses = [700, 700, 700, 700, 5_500];
    for pause in pauses {
        write_in_place(&path, head, tail, Duration::from_millis(pause), false)?;
    }
    // A writer that closes the file between its two writes: the torn file parses and
    // removes two services, so it waits for the removal hold, and the rest arrives first.
    for _ in 0..3 {
        write_in_place(&path, head, tail, Duration::from_millis(1_500), true)?;
    }
    std::thread::sleep(Duration::from_millis(500));
    let summary = World::finish_loop(child, &stop)?;
    ensure!(
        summary.failed == 0,
        "torn writes failed connects: {summary:?}\nlog:\n{}",
        w.log()
    );
    ensure!(summary.ok > 100, "the loop barely ran: {summary:?}");
    ensure!(service_count(&mut w)? == 3);
    let log = w.log();
    ensure!(
        !log.contains("services=1"),
        "a torn file was applied:\n{log}"
    );
    ensure!(
        log.contains("removes something"),
        "the reopened writer's torn file was not held:\n{log}"
    );
    Ok(())
}

#[test]
fn empty_and_node_only_files_are_refused_and_services_keep_serving() -> Result<()> {
    let mut w = World::new()?;
    w.backend("b1", "127.10.20.11:8080")?;
    let good = "services:\n  - name: keep\n    vips: [127.210.20.11]\n    ports: [{number: 80, targetPort: 8080}]\n    healthCheck: {disabled: true}\n    endpoints: [{address: 127.10.20.11}]\n";
    w.write_config(good)?;
    w.start_agent()?;
    let path = w.config_path();
    for (text, why) in [
        ("", "the configuration is empty"),
        (
            "node:\n  locality: us-east1/us-east1-b\n",
            "`services` is missing",
        ),
    ] {
        std::fs::write(&path, text)?;
        w.agent().reload()?;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !w.log().contains(why) {
            ensure!(
                std::time::Instant::now() < deadline,
                "no rejection for {text:?}:\n{}",
                w.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        ensure!(service_count(&mut w)? == 1, "after {text:?}");
        let got = w.answers("127.210.20.11:80", 5)?;
        ensure!(got.get("b1") == Some(&5), "after {text:?}: {got:?}");
    }
    // Removing every service is possible, but only when the file says so.
    w.write_config("services: []\n")?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while service_count(&mut w)? != 0 {
        ensure!(
            std::time::Instant::now() < deadline,
            "services: [] not applied"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}
