//! Upgrades under load: agents whose programs or map sizes differ take over the pinned
//! programs and maps from each other while a client connects through a VIP in a loop,
//! and no connect fails.
//!
//! Two real builds: build A is the `detour` these tests are built with; build B is the
//! same agent built with `DETOUR_EBPF_VARIANT=1` (see `agent/build.rs`), whose connect
//! programs differ in code and so in program tag. B lives in `<target>/upgrade-variant`:
//! `cargo xtask test` builds it before the tests run, and the test runs the same cargo
//! command first (a no-op then; alone, a cold build takes minutes and later ones only
//! rebuild what changed), unless `DETOUR_UPGRADE_VARIANT` names build B already built
//! (`cargo xtask test-kernels`, whose guests cannot run cargo). A failing build fails the
//! test, it never skips.
//!
//! Which program a pinned link runs is read from the kernel: each pin under `links/` is
//! opened and the tag of the program its link holds is looked up by id.
//!
//! Addresses: VIPs 127.210.6N.x, backends 127.10.6N.x, N per test.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use aya::maps::MapInfo;
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::loaded_programs;
use detour_ebpf::programs;
use detour_testbed::output_with_timeout;

use crate::world::{endpoint, link_outcomes as outcomes, World, READY_TIMEOUT};

/// How long connects flow through each agent (and each gap between agents).
const DWELL: Duration = Duration::from_millis(300);
/// Upper bound on building build B.
const VARIANT_BUILD_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// The program each pinned link runs: its id and tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Running {
    id: u32,
    tag: u64,
}

/// Link pin name (the program's name) → the program it runs.
fn pinned_programs(pins: &Path) -> Result<BTreeMap<String, Running>> {
    let mut out = BTreeMap::new();
    let dir = pins.join("links");
    for entry in std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .context("link pin name")?
            .to_string();
        let link = FdLink::from(
            PinnedLink::from_pin(&path).with_context(|| format!("opening {}", path.display()))?,
        );
        let id = link.info()?.program_id();
        let program = loaded_programs()
            .filter_map(Result::ok)
            .find(|p| p.id() == id)
            .with_context(|| format!("{name}: program {id} is not loaded"))?;
        out.insert(
            name,
            Running {
                id,
                tag: program.tag(),
            },
        );
    }
    Ok(out)
}

/// Build B: the agent with `DETOUR_EBPF_VARIANT=1`, built once per test process.
/// Names build B when the caller built it already: `cargo xtask test-kernels` runs this
/// suite in guests whose view of the checkout is read-only, so cargo cannot run there.
const VARIANT_ENV: &str = "DETOUR_UPGRADE_VARIANT";

fn variant_binary() -> Result<PathBuf> {
    if let Some(given) = std::env::var_os(VARIANT_ENV) {
        let given = PathBuf::from(given);
        ensure!(
            given.is_file(),
            "{VARIANT_ENV}={} is not a file",
            given.display()
        );
        return Ok(given);
    }
    static BUILT: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| build_variant().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

fn build_variant() -> Result<PathBuf> {
    // `<target>/<profile>/detour` → `<target>`.
    let own = Path::new(env!("CARGO_BIN_EXE_detour"));
    let profile_dir = own.parent().context("binary directory")?;
    let target = profile_dir.parent().context("target directory")?;
    let variant_target = target.join("upgrade-variant");
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&workspace)
        .args(["build", "-p", "detour-agent", "--bin", "detour"])
        .env("CARGO_TARGET_DIR", &variant_target)
        .env("DETOUR_EBPF_VARIANT", "1");
    if !cfg!(debug_assertions) {
        cmd.arg("--release");
    }
    let started = Instant::now();
    let out = output_with_timeout(&mut cmd, VARIANT_BUILD_TIMEOUT)
        .with_context(|| format!("building the variant agent: {cmd:?}"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: String = stderr
            .lines()
            .rev()
            .take(40)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n");
        bail!(
            "building the variant agent ({cmd:?}) failed: {}\n{tail}",
            out.status
        );
    }
    let profile = profile_dir.file_name().context("profile directory name")?;
    let binary = variant_target.join(profile).join("detour");
    ensure!(
        binary.is_file(),
        "{} missing after the build",
        binary.display()
    );
    eprintln!(
        "upgrade: variant agent {} ready in {:?}",
        binary.display(),
        started.elapsed()
    );
    Ok(binary)
}

/// Starts `binary` as the world's agent, with `args`, and waits until it answers.
/// Returns where this agent's lines begin in the (shared, appended) log.
fn start(w: &mut World, binary: &Path, args: &[&str]) -> Result<usize> {
    let from = w.log().len();
    let mut options = w.bed.options();
    options.binary = binary.to_owned();
    w.bed.start_agent_with(options, args, READY_TIMEOUT)?;
    Ok(from)
}

/// Stops the running agent; its programs stay attached through their pins.
fn stop(w: &mut World) -> Result<()> {
    if let Some(mut agent) = w.agent.take() {
        agent.stop()?;
    }
    Ok(())
}

fn config(services: &[(&str, &str, &str)]) -> String {
    let mut yaml = String::from("services:\n");
    for (name, vip, backend) in services {
        yaml.push_str(&format!(
            "  - name: {name}\n    vips: [{vip}]\n    ports: [{{number: 80, targetPort: 8080}}]\n    healthCheck: {{disabled: true}}\n    endpoints: [{{address: {backend}}}]\n"
        ));
    }
    yaml
}

const CONNECT_PROGRAMS: [&str; 2] = [programs::CONNECT4, programs::CONNECT6];
const OTHER_PROGRAMS: [&str; 4] = [
    programs::RECEIVE_RESET,
    programs::SOCK_OPS,
    programs::GETPEERNAME4,
    programs::GETPEERNAME6,
];

/// Polls until no program with `id` is loaded: a replaced link let go of it.
fn wait_unloaded(id: u32) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    while loaded_programs()
        .filter_map(Result::ok)
        .any(|p| p.id() == id)
    {
        ensure!(
            Instant::now() < deadline,
            "program {id} is still loaded: its replaced link did not detach"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

#[test]
fn an_upgrade_and_a_downgrade_replace_the_programs_under_a_connect_loop() -> Result<()> {
    let variant = variant_binary()?;
    let build_a = PathBuf::from(env!("CARGO_BIN_EXE_detour"));
    let mut w = World::new()?;
    w.backend("a", "127.10.60.1:8080")?;
    w.write_config(&config(&[("steady", "127.210.60.1", "127.10.60.1")]))?;
    let vip = "127.210.60.1:80";

    start(&mut w, &build_a, &[])?;
    let a = pinned_programs(w.pins.path())?;
    ensure!(a.len() == programs::ALL.len(), "build A pinned {a:?}");
    let (child, stop_file) = w.connect_loop(vip)?;
    std::thread::sleep(DWELL);

    // Upgrade: A stops (its programs keep serving), B takes over.
    stop(&mut w)?;
    std::thread::sleep(DWELL);
    let from = start(&mut w, &variant, &[])?;
    std::thread::sleep(DWELL);
    let b = pinned_programs(w.pins.path())?;
    let log = w.log();
    let log = &log[from..];
    let b_outcomes = outcomes(log);
    for program in CONNECT_PROGRAMS {
        ensure!(
            b[program].tag != a[program].tag,
            "{program}: build B should run another program than A: {:x} both",
            a[program].tag
        );
        ensure!(
            b_outcomes.get(program).map(String::as_str) == Some("Replaced"),
            "{program} in build B: {b_outcomes:?}\n{log}"
        );
        ensure!(
            log.contains(&format!("new_tag={:016x}", b[program].tag)),
            "build B did not log installing {program}'s pinned tag {:016x}:\n{log}",
            b[program].tag
        );
        wait_unloaded(a[program].id)?;
    }
    ensure!(
        !log.contains("map migrated"),
        "same map layouts, yet build B migrated a map:\n{log}"
    );
    for program in OTHER_PROGRAMS {
        // The variant leaves these unchanged: B adopts A's links.
        ensure!(b[program] == a[program], "{program}: A {a:?}, B {b:?}");
        ensure!(
            b_outcomes.get(program).map(String::as_str) == Some("Adopted"),
            "{program} in build B: {b_outcomes:?}"
        );
    }

    // Downgrade: back to A's programs.
    stop(&mut w)?;
    std::thread::sleep(DWELL);
    let from = start(&mut w, &build_a, &[])?;
    std::thread::sleep(DWELL);
    let back = pinned_programs(w.pins.path())?;
    let a_outcomes = outcomes(&w.log()[from..]);
    for program in CONNECT_PROGRAMS {
        ensure!(
            back[program].tag == a[program].tag && back[program].id != b[program].id,
            "{program}: after the downgrade {back:?}, build A ran {a:?}"
        );
        ensure!(
            a_outcomes.get(program).map(String::as_str) == Some("Replaced"),
            "{program} after the downgrade: {a_outcomes:?}"
        );
        wait_unloaded(b[program].id)?;
    }

    let summary = World::finish_loop(child, &stop_file)?;
    eprintln!("upgrade: connect loop across upgrade and downgrade: {summary:?}");
    ensure!(
        summary.failed == 0,
        "connects failed across the upgrade and downgrade: {summary:?}\nlog:\n{}",
        w.log()
    );
    ensure!(summary.ok > 100, "the loop barely ran: {summary:?}");
    // State survived both hand-overs: the kernel's counter of the backend has every
    // connect of the loop (plus the agents' own), and the table still answers.
    let eps = w.agent().endpoints_json(Some("steady"))?;
    let connects = endpoint(&eps, "127.10.60.1:8080")?["connects"]
        .as_u64()
        .context("connects")?;
    ensure!(
        connects >= summary.ok,
        "backend counter {connects} < {} connects of the loop: {eps:#}",
        summary.ok
    );
    let answers = w.answers(vip, 5)?;
    ensure!(answers.get("a") == Some(&5), "{answers:?}");
    Ok(())
}

/// `max_entries` of a pinned map.
fn pinned_size(w: &World, map: &str) -> Result<u32> {
    let path = w.pins.path().join("maps").join(map);
    Ok(MapInfo::from_pin(&path)
        .with_context(|| format!("reading {}", path.display()))?
        .max_entries())
}

fn wait_answered(w: &World, vip: &str, backend: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = w.answers(vip, 3)?;
        if got.get(backend) == Some(&3) {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{vip}: answers {got:?}, want {backend}\nlog:\n{}",
            w.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_map_resized_between_runs_is_migrated_under_a_connect_loop() -> Result<()> {
    let binary = PathBuf::from(env!("CARGO_BIN_EXE_detour"));
    let mut w = World::new()?;
    let services: Vec<(String, String, String)> = (1..=5)
        .map(|i| {
            (
                format!("s{i}"),
                format!("127.210.61.{i}"),
                format!("127.10.61.{i}"),
            )
        })
        .collect();
    for (name, _, backend) in &services {
        w.backend(name, &format!("{backend}:8080"))?;
    }
    let borrowed: Vec<(&str, &str, &str)> = services
        .iter()
        .map(|(n, v, b)| (n.as_str(), v.as_str(), b.as_str()))
        .collect();
    w.write_config(&config(&borrowed))?;

    // Four services fit; s5 waits for room.
    start(&mut w, &binary, &["--max-services", "4"])?;
    ensure!(pinned_size(&w, "DETOUR_SERVICES")? == 4);
    wait_answered(&w, "127.210.61.1:80", "s1")?;
    let before = pinned_programs(w.pins.path())?;
    let (child, stop_file) = w.connect_loop("127.210.61.1:80")?;
    std::thread::sleep(DWELL);

    // The operator grows the map: the pinned one is migrated, and s5 fits now.
    stop(&mut w)?;
    let from = start(&mut w, &binary, &["--max-services", "8"])?;
    std::thread::sleep(DWELL);
    ensure!(pinned_size(&w, "DETOUR_SERVICES")? == 8);
    let log = w.log();
    let log = &log[from..];
    ensure!(
        log.contains("map migrated map=\"DETOUR_SERVICES\""),
        "no migration of DETOUR_SERVICES logged:\n{log}"
    );
    let grown = outcomes(log);
    for program in CONNECT_PROGRAMS {
        // Same code, but bound to the old map: replaced, never adopted.
        ensure!(
            grown.get(program).map(String::as_str) == Some("Replaced"),
            "{program} after the map grew: {grown:?}\n{log}"
        );
        wait_unloaded(before[program].id)?;
    }
    wait_answered(&w, "127.210.61.5:80", "s5")?;

    // And shrinks it again, to what still holds all five.
    stop(&mut w)?;
    start(&mut w, &binary, &["--max-services", "6"])?;
    std::thread::sleep(DWELL);
    ensure!(pinned_size(&w, "DETOUR_SERVICES")? == 6);

    let summary = World::finish_loop(child, &stop_file)?;
    eprintln!("upgrade: connect loop across two map migrations: {summary:?}");
    ensure!(
        summary.failed == 0,
        "connects failed across the map migrations: {summary:?}\nlog:\n{}",
        w.log()
    );
    ensure!(summary.ok > 100, "the loop barely ran: {summary:?}");
    for (name, vip, _) in &services {
        wait_answered(&w, &format!("{vip}:80"), name)?;
    }
    // The backend counters came along with the maps.
    let eps = w.agent().endpoints_json(Some("s1"))?;
    let connects = endpoint(&eps, "127.10.61.1:8080")?["connects"]
        .as_u64()
        .context("connects")?;
    ensure!(
        connects >= summary.ok,
        "s1's counter {connects} < {} connects of the loop: {eps:#}",
        summary.ok
    );
    Ok(())
}
