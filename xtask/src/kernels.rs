//! `cargo xtask test-kernels`: the privileged end-to-end suite on the kernels users run
//! (Debian's 5.10, 6.1 and 6.12), each booted under qemu.
//!
//! How a run goes, per kernel:
//! 1. **Fetch** (once): Debian's `linux-image-amd64` of the kernel's suite is resolved to
//!    its versioned package with a private APT configuration under
//!    `target/kernels/apt/` (its own sources list, lists and cache: the machine's APT
//!    setup is never touched; signatures are checked against the machine's Debian
//!    keyring), downloaded, and unpacked into `target/kernels/<series>/root/`. The
//!    package name is kept in `target/kernels/<series>/package`; later runs reuse the
//!    unpacked tree without the network (`--refresh` fetches again).
//! 2. **Initramfs**: busybox (Debian's static build), the modules the guest needs that
//!    the kernel has as modules (virtio, 9p, the socket-diag modules `SOCK_DESTROY`
//!    needs, veth), decompressed and ordered by their `depends=` (read from each
//!    module's `.modinfo` section), and an `/init` script.
//! 3. **Boot**: `qemu-system-x86_64` with KVM when a probe boot under it reaches its
//!    init, else the emulator (`-accel tcg -cpu max`, ~15× slower). The guest mounts this machine's root read-only over
//!    9p and chroots into it, so the test binary, the agent and the control-plane
//!    binaries run at their own paths (`CARGO_BIN_EXE_detour` resolves), with tmpfs on
//!    `/tmp`, `/run` and `/var/tmp`, its own cgroup2, bpffs, `/proc`, `/sys` and `/dev`.
//!    Nothing the guest does reaches this machine's cgroups, pins or network: it has no
//!    network device and a read-only view of the files.
//! 4. **Report**: the console is kept in `target/kernels/<series>/console.log` (each
//!    line prefixed with the seconds since qemu started); each
//!    `test NAME ... ok|FAILED` line and the guest's exit code make the verdict.
//!
//! Invariants: a kernel whose guest does not finish within [`GUEST_TIMEOUT`] fails (the
//! qemu process is killed); any failed test, missing verdict or non-zero exit fails the
//! task, after every kernel has run. Only a kernel that died before the guest's init ran
//! (so no test started) is booted again, at most [`BOOT_RETRIES`] times, and the summary
//! says so.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use crate::cmd;

/// Longest a guest may run (boot, suite, power-off) before it is killed.
pub const GUEST_TIMEOUT: Duration = Duration::from_secs(40 * 60);

/// Boots of one kernel that crashed before its init ran and are tried again.
const BOOT_RETRIES: u32 = 2;

/// A kernel series, the Debian suite that ships it, and where its package puts modules.
#[derive(Debug, Clone, Copy)]
pub struct Kernel {
    pub series: &'static str,
    pub suite: &'static str,
}

/// The kernels the matrix runs, oldest first.
pub const KERNELS: [Kernel; 3] = [
    Kernel {
        series: "5.10",
        suite: "bullseye",
    },
    Kernel {
        series: "6.1",
        suite: "bookworm",
    },
    Kernel {
        series: "6.12",
        suite: "trixie",
    },
];

/// Modules the guest loads when the kernel has them as modules (built in: skipped).
/// `sch_ingress` (the clsact qdisc) and `cls_bpf` carry SYN steering's tc program on
/// kernels before tcx (6.6); on a node the agent loads them with `modprobe`.
const GUEST_MODULES: [&str; 9] = [
    "virtio_pci",
    "9pnet_virtio",
    "9p",
    "inet_diag",
    "tcp_diag",
    "udp_diag",
    "veth",
    "sch_ingress",
    "cls_bpf",
];

#[derive(Debug, clap::Args)]
pub struct KernelArgs {
    /// Only these kernel series (5.10, 6.1, 6.12); all by default.
    #[arg(long = "kernel")]
    pub kernels: Vec<String>,
    /// Passed to the e2e test binary (a test name filter, `--skip NAME`, ...).
    #[arg(last = true)]
    pub args: Vec<String>,
    /// Fetch the kernels again even when an unpacked one is cached.
    #[arg(long)]
    pub refresh: bool,
}

/// One kernel's outcome.
#[derive(Debug, Default)]
pub struct KernelRun {
    pub series: String,
    pub release: String,
    pub passed: Vec<String>,
    pub failed: Vec<String>,
    pub ignored: usize,
    pub exit: Option<i32>,
    pub elapsed: Duration,
    pub accel: &'static str,
    pub problem: Option<String>,
    /// The guest's init said it runs (`detour-guest: kernel ...`): the kernel booted.
    pub booted: bool,
    /// Boots that crashed before the guest's init ran, and were tried again.
    pub boots_retried: u32,
}

impl KernelRun {
    fn ok(&self) -> bool {
        self.problem.is_none() && self.failed.is_empty() && self.exit == Some(0)
    }
}

/// `cargo xtask test-kernels`.
pub fn run(args: &KernelArgs) -> Result<()> {
    detour_testbed::require_root("booting kernels to run the privileged suite in")?;
    let chosen: Vec<Kernel> = if args.kernels.is_empty() {
        KERNELS.to_vec()
    } else {
        args.kernels
            .iter()
            .map(|series| {
                KERNELS
                    .iter()
                    .find(|k| k.series == series)
                    .copied()
                    .with_context(|| format!("no kernel {series} in the matrix (5.10, 6.1, 6.12)"))
            })
            .collect::<Result<_>>()?
    };
    let suite = build_suite()?;
    let mut runs = Vec::new();
    for kernel in chosen {
        let unpacked = fetch(kernel, args.refresh)?;
        let mut run = boot(kernel, &unpacked, &suite, &args.args)?;
        // An emulated kernel that dies while booting (seen once: 6.12 under TCG, an int3
        // oops in early scheduler set-up, one boot in many) has run none of the suite:
        // boot it again, a bounded number of times, and say so. A kernel that booted is
        // never retried, whatever its suite did.
        let mut retried = 0;
        while !run.booted && run.exit.is_none() && retried < BOOT_RETRIES {
            retried += 1;
            eprintln!(
                "kernel {}: the guest crashed before its init ran (console.log); booting it again ({retried}/{BOOT_RETRIES})",
                kernel.series
            );
            run = boot(kernel, &unpacked, &suite, &args.args)?;
        }
        run.boots_retried = retried;
        print_run(&run);
        runs.push(run);
    }
    println!("\nkernel matrix:");
    for run in &runs {
        println!(
            "  {} ({}): {} passed, {} failed, {} ignored, {:.0?} under {}{}{}",
            run.series,
            run.release,
            run.passed.len(),
            run.failed.len(),
            run.ignored,
            run.elapsed,
            run.accel,
            if run.boots_retried > 0 {
                format!(" (after {} crashed boot(s))", run.boots_retried)
            } else {
                String::new()
            },
            run.problem
                .as_ref()
                .map(|p| format!(" — {p}"))
                .unwrap_or_default()
        );
    }
    let bad: Vec<&str> = runs
        .iter()
        .filter(|r| !r.ok())
        .map(|r| r.series.as_str())
        .collect();
    ensure!(
        bad.is_empty(),
        "the suite failed on kernel(s) {}",
        bad.join(", ")
    );
    Ok(())
}

fn print_run(run: &KernelRun) {
    for name in &run.failed {
        println!("kernel {}: FAILED {name}", run.series);
    }
}

/// What the guests run: the e2e test binary, and the upgrade tests' second agent.
#[derive(Debug)]
struct Suite {
    e2e: PathBuf,
    variant: PathBuf,
    k8s_assets: Option<PathBuf>,
}

fn build_suite() -> Result<Suite> {
    // The upgrade tests' second build, as `cargo xtask test` makes it; the guest's root
    // is read-only, so the test is handed the binary instead of running cargo there.
    let variant_target = cmd::target_dir().join("upgrade-variant");
    // Release builds: under emulation the suite's own processes (agents, clients, the
    // test harness) are most of the guest's CPU, and unoptimised code took twice as long.
    cmd::run(
        cmd::cargo()
            .args([
                "build",
                "--release",
                "-p",
                "detour-agent",
                "--bin",
                "detour",
            ])
            .env("CARGO_TARGET_DIR", &variant_target)
            .env("DETOUR_EBPF_VARIANT", "1"),
    )?;
    let mut build = cmd::cargo();
    build.args([
        "test",
        "--release",
        "-p",
        "detour-agent",
        "--test",
        "e2e",
        "--no-run",
        "--message-format=json-render-diagnostics",
    ]);
    eprintln!("$ {}", cmd::display(&build));
    let out = build
        .stderr(Stdio::inherit())
        .output()
        .context("building the e2e suite")?;
    ensure!(
        out.status.success(),
        "building the e2e suite failed: {}",
        out.status
    );
    let e2e = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "e2e")
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .context("cargo built no e2e executable")?;
    Ok(Suite {
        e2e,
        variant: variant_target.join("release").join("detour"),
        k8s_assets: crate::k8s_assets::prepare()?
            .or_else(|| std::env::var_os(detour_testbed::k8s::ASSETS_ENV).map(PathBuf::from)),
    })
}

/// The unpacked kernel package of `kernel`: fetched unless cached (or `refresh`).
fn fetch(kernel: Kernel, refresh: bool) -> Result<Unpacked> {
    let dir = kernels_dir().join(kernel.series);
    let package_file = dir.join("package");
    let root = dir.join("root");
    if !refresh {
        if let Ok(package) = fs::read_to_string(&package_file) {
            if let Ok(unpacked) = Unpacked::find(package.trim(), &root) {
                eprintln!("kernel {}: {} (cached)", kernel.series, unpacked.release);
                return Ok(unpacked);
            }
        }
    }
    let apt = Apt::new()?;
    let depends = apt.query(&[
        "depends",
        "--important",
        &format!("linux-image-amd64/{}", kernel.suite),
    ])?;
    let package = depends
        .lines()
        .find_map(|l| l.trim().strip_prefix("Depends: "))
        .map(str::trim)
        .filter(|p| p.starts_with("linux-image-"))
        .with_context(|| {
            format!(
                "linux-image-amd64/{} names no kernel package:\n{depends}",
                kernel.suite
            )
        })?
        .to_owned();
    let downloads = dir.join("download");
    let _ = fs::remove_dir_all(&downloads);
    fs::create_dir_all(&downloads)?;
    apt.download(&package, &downloads)?;
    let deb = fs::read_dir(&downloads)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .with_context(|| format!("apt-get download {package} left no .deb"))?;
    let _ = fs::remove_dir_all(&root);
    fs::create_dir_all(&root)?;
    cmd::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
    fs::remove_dir_all(&downloads)?;
    fs::write(&package_file, format!("{package}\n"))?;
    let unpacked = Unpacked::find(&package, &root)?;
    eprintln!("kernel {}: {} (fetched)", kernel.series, unpacked.release);
    Ok(unpacked)
}

fn kernels_dir() -> PathBuf {
    cmd::target_dir().join("kernels")
}

/// APT with its own configuration under `target/kernels/apt/`.
struct Apt {
    dir: PathBuf,
}

impl Apt {
    fn new() -> Result<Self> {
        let dir = kernels_dir().join("apt");
        for sub in ["lists/partial", "cache/archives/partial"] {
            fs::create_dir_all(dir.join(sub))?;
        }
        let sources: String = KERNELS
            .iter()
            .map(|k| format!("deb http://deb.debian.org/debian {} main\n", k.suite))
            .collect();
        fs::write(dir.join("sources.list"), sources)?;
        let apt = Self { dir };
        cmd::run(apt.command("apt-get").args(["-q", "update"]))?;
        Ok(apt)
    }

    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        let opt = |k: &str, v: &Path| format!("{k}={}", v.display());
        c.args([
            "-o",
            &opt("Dir::Etc::sourcelist", &self.dir.join("sources.list")),
            "-o",
            "Dir::Etc::sourceparts=-",
            "-o",
            &opt("Dir::State::lists", &self.dir.join("lists")),
            "-o",
            &opt("Dir::Cache", &self.dir.join("cache")),
            "-o",
            "Debug::NoLocking=1",
            "-o",
            "APT::Sandbox::User=root",
        ]);
        c
    }

    fn query(&self, args: &[&str]) -> Result<String> {
        let mut c = self.command("apt-cache");
        c.args(args);
        cmd::stdout_of(&mut c).with_context(|| format!("`{}` failed", cmd::display(&c)))
    }

    fn download(&self, package: &str, into: &Path) -> Result<()> {
        cmd::run(
            self.command("apt-get")
                .current_dir(into)
                .args(["-q", "download", package]),
        )
    }
}

/// An unpacked kernel package: its image and modules.
#[derive(Debug, Clone)]
struct Unpacked {
    release: String,
    vmlinuz: PathBuf,
    config: PathBuf,
    modules: PathBuf,
}

impl Unpacked {
    /// Finds the kernel in `root` (Debian puts modules in `/lib/modules` up to 6.1 and
    /// in `/usr/lib/modules` from 6.12).
    fn find(package: &str, root: &Path) -> Result<Self> {
        let release = package
            .strip_prefix("linux-image-")
            .with_context(|| format!("{package} is no linux-image package"))?
            .to_owned();
        let vmlinuz = root.join("boot").join(format!("vmlinuz-{release}"));
        let config = root.join("boot").join(format!("config-{release}"));
        let modules = ["lib/modules", "usr/lib/modules"]
            .iter()
            .map(|m| root.join(m).join(&release))
            .find(|m| m.is_dir())
            .with_context(|| format!("no modules of {release} under {}", root.display()))?;
        ensure!(vmlinuz.is_file(), "{} missing", vmlinuz.display());
        ensure!(config.is_file(), "{} missing", config.display());
        Ok(Self {
            release,
            vmlinuz,
            config,
            modules,
        })
    }

    /// Whether the kernel's config has `option` built in (`=y`).
    fn built_in(&self, option: &str) -> Result<bool> {
        let config = fs::read_to_string(&self.config)?;
        Ok(config.lines().any(|l| l == format!("{option}=y")))
    }
}

/// A module file by module name (`-` and `_` are the same in module names).
fn module_files(dir: &Path) -> Result<std::collections::HashMap<String, PathBuf>> {
    let mut files = std::collections::HashMap::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Some(name) = path.file_name().and_then(|n| n.to_str()) {
                if let Some((module, _)) = name.split_once(".ko") {
                    files.insert(module.replace('-', "_"), path);
                }
            }
        }
    }
    Ok(files)
}

/// A module's bytes, decompressed (`.ko.xz`, `.ko.zst` as Debian ships them).
fn module_bytes(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        Some("xz")
    } else if name.ends_with(".zst") {
        Some("zstd")
    } else {
        None
    };
    match tool {
        None => Ok(fs::read(path)?),
        Some(tool) => {
            let out = Command::new(tool)
                .arg("-dc")
                .arg(path)
                .output()
                .with_context(|| format!("running {tool} -dc {}", path.display()))?;
            ensure!(out.status.success(), "{tool} -dc {} failed", path.display());
            Ok(out.stdout)
        }
    }
}

/// The modules a module needs first: its `.modinfo` section's `depends=`.
fn module_depends(image: &[u8]) -> Result<Vec<String>> {
    use object::{Object, ObjectSection};
    let file = object::File::parse(image).context("not an ELF module")?;
    let Some(section) = file.section_by_name(".modinfo") else {
        return Ok(Vec::new());
    };
    let data = section.data()?;
    Ok(data
        .split(|&b| b == 0)
        .filter_map(|entry| entry.strip_prefix(b"depends="))
        .flat_map(|list| list.split(|&b| b == b','))
        .filter(|m| !m.is_empty())
        .map(|m| String::from_utf8_lossy(m).replace('-', "_"))
        .collect())
}

/// `wanted` and what they depend on, dependencies first, as (name, decompressed image).
fn modules_in_order(unpacked: &Unpacked, wanted: &[&str]) -> Result<Vec<(String, Vec<u8>)>> {
    let files = module_files(&unpacked.modules)?;
    let mut order: Vec<(String, Vec<u8>)> = Vec::new();
    // Depth-first, bounded: a module graph has no cycles, and never this many levels.
    fn visit(
        name: &str,
        files: &std::collections::HashMap<String, PathBuf>,
        order: &mut Vec<(String, Vec<u8>)>,
        depth: usize,
    ) -> Result<()> {
        ensure!(depth < 32, "module dependencies deeper than 32 at {name}");
        if order.iter().any(|(n, _)| n == name) {
            return Ok(());
        }
        let path = files
            .get(name)
            .with_context(|| format!("module {name} not found"))?;
        let image = module_bytes(path)?;
        for dep in module_depends(&image)? {
            visit(&dep, files, order, depth + 1)?;
        }
        if !order.iter().any(|(n, _)| n == name) {
            order.push((name.to_owned(), image));
        }
        Ok(())
    }
    for name in wanted {
        if files.contains_key(*name) {
            visit(name, &files, &mut order, 0)?;
        } else {
            let option = match *name {
                "virtio_pci" => "CONFIG_VIRTIO_PCI",
                other => bail!("module {other} not in {}", unpacked.modules.display()),
            };
            ensure!(
                unpacked.built_in(option)?,
                "{name} is neither a module nor built in ({option})"
            );
        }
    }
    Ok(order)
}

/// The guest's `/init`: mounts, modules, the host's root, then the suite in a chroot.
const INIT: &str = r#"#!/bin/busybox sh
B=/bin/busybox
$B mkdir -p /proc /sys /dev /mnt
$B mount -t proc proc /proc
$B mount -t sysfs sys /sys
$B mount -t devtmpfs dev /dev
for m in $($B cat /modules/order); do
  $B insmod /modules/$m.ko || echo "detour-guest: insmod $m failed"
done
if ! $B mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,ro hostroot /mnt; then
  echo "detour-guest: mounting the host's root failed"
  $B poweroff -f
fi
# Paths the suite needs that the tmpfs mounts below would hide (a checkout under /tmp):
# held aside by a bind mount, then put back on top.
n=0
for p in $($B cat /keep); do
  n=$((n + 1)); $B mkdir -p /keep.d/$n; $B mount -o bind /mnt$p /keep.d/$n
done
for d in tmp run var/tmp; do $B mount -t tmpfs tmpfs /mnt/$d; done
n=0
for p in $($B cat /keep); do
  n=$((n + 1)); $B mkdir -p /mnt$p; $B mount -o bind /keep.d/$n /mnt$p
done
$B mount -t proc proc /mnt/proc
$B mount -t sysfs sys /mnt/sys
$B mount -t devtmpfs dev /mnt/dev
$B mount -t cgroup2 cgroup2 /mnt/sys/fs/cgroup
$B mount -t bpf bpf /mnt/sys/fs/bpf
$B cp /suite.sh /mnt/tmp/detour-suite.sh
echo "detour-guest: kernel $($B uname -r)"
$B chroot /mnt /bin/sh /tmp/detour-suite.sh
echo "detour-guest: exit $?"
$B poweroff -f
"#;

/// Quotes `s` for the guest's `sh`.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn suite_script(suite: &Suite, extra: &[String]) -> String {
    let mut env = vec![
        ("RUST_BACKTRACE", "1".to_owned()),
        ("NO_COLOR", "1".to_owned()),
        (
            "DETOUR_UPGRADE_VARIANT",
            suite.variant.display().to_string(),
        ),
    ];
    if let Some(assets) = &suite.k8s_assets {
        env.push((
            detour_testbed::k8s::ASSETS_ENV,
            assets.display().to_string(),
        ));
    }
    let exports: String = env
        .iter()
        .map(|(k, v)| format!("export {k}={}\n", sh_quote(v)))
        .collect();
    // One test at a time: the guest's two emulated CPUs run ~15× slower, and two
    // control planes at once (etcd, kube-apiserver, agents) starved each other past the
    // tests' 40 s bounds, where one at a time passes.
    let args: Vec<String> = ["--test-threads", "1", "--color", "never"]
        .iter()
        .map(|a| (*a).to_owned())
        .chain(extra.iter().cloned())
        .map(|a| sh_quote(&a))
        .collect();
    format!(
        "ip link set lo up\ncd {}\n{exports}{} {}\n",
        sh_quote(&cmd::workspace_root().join("agent").display().to_string()),
        sh_quote(&suite.e2e.display().to_string()),
        args.join(" ")
    )
}

/// The directories the guest must see that its tmpfs mounts (`/tmp`, `/run`,
/// `/var/tmp`) would hide: the checkout, the target directory and the control-plane
/// binaries, when they live under one of those (a checkout in `/tmp`, as CI may make).
fn kept_paths(suite: &Suite) -> Vec<String> {
    let hidden = |p: &Path| {
        ["/tmp", "/run", "/var/tmp"]
            .iter()
            .any(|d| p.starts_with(d))
    };
    let mut kept: Vec<PathBuf> = Vec::new();
    let candidates = [
        Some(cmd::workspace_root().to_path_buf()),
        Some(cmd::target_dir()),
        suite.e2e.parent().map(Path::to_path_buf),
        suite.k8s_assets.clone(),
    ];
    for path in candidates.into_iter().flatten() {
        let path = path.canonicalize().unwrap_or(path);
        if hidden(&path) && !kept.iter().any(|k| path.starts_with(k)) {
            kept.retain(|k| !k.starts_with(&path));
            kept.push(path);
        }
    }
    kept.iter().map(|p| p.display().to_string()).collect()
}

/// Writes the initramfs (gzip'd newc cpio, by the machine's `cpio` and `gzip`).
fn initramfs(unpacked: &Unpacked, suite: &Suite, script: &str, out: &Path) -> Result<()> {
    let staging = out.with_extension("d");
    let _ = fs::remove_dir_all(&staging);
    fs::create_dir_all(staging.join("bin"))?;
    fs::create_dir_all(staging.join("modules"))?;
    fs::copy("/bin/busybox", staging.join("bin/busybox")).context(
        "copying /bin/busybox (Debian's busybox-static; `cargo xtask setup` installs it)",
    )?;
    let mut order = String::new();
    for (name, image) in modules_in_order(unpacked, &GUEST_MODULES)? {
        fs::write(staging.join("modules").join(format!("{name}.ko")), image)?;
        order.push_str(&name);
        order.push('\n');
    }
    fs::write(staging.join("modules/order"), order)?;
    write_executable(&staging.join("init"), INIT)?;
    write_executable(&staging.join("probe"), PROBE)?;
    write_executable(&staging.join("suite.sh"), script)?;
    fs::write(staging.join("keep"), kept_paths(suite).join("\n") + "\n")?;
    let archive = fs::File::create(out)?;
    let status = Command::new("sh")
        .arg("-c")
        .arg("find . | cpio --quiet -o -H newc | gzip -1")
        .current_dir(&staging)
        .stdout(archive)
        .status()
        .context("packing the initramfs (cpio, gzip)")?;
    ensure!(status.success(), "packing the initramfs failed: {status}");
    fs::remove_dir_all(&staging)?;
    Ok(())
}

fn write_executable(path: &Path, text: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::write(path, text)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// The guest's `/probe` (booted with `rdinit=/probe`): proves the kernel starts.
const PROBE: &str = "#!/bin/busybox sh\necho 'detour-guest: probe ok'\n/bin/busybox poweroff -f\n";

/// Whether KVM runs a stock kernel here: a probe boot under `-accel kvm` reaches its
/// init. `/dev/kvm` alone says too little: on a paravirtual hypervisor it exists and
/// creates VMs, but qemu aborts setting up the vCPU (`failed to set MSR`).
fn kvm_boots(unpacked: &Unpacked, initrd: &Path) -> bool {
    if !Path::new("/dev/kvm").exists() {
        return false;
    }
    let mut qemu = Command::new("timeout");
    qemu.args([
        "60",
        "qemu-system-x86_64",
        "-accel",
        "kvm",
        "-cpu",
        "host",
        "-m",
        "512",
    ])
    .args(["-nographic", "-no-reboot", "-net", "none"])
    .arg("-kernel")
    .arg(&unpacked.vmlinuz)
    .arg("-initrd")
    .arg(initrd)
    .args(["-append", "console=ttyS0 panic=-1 quiet rdinit=/probe"])
    .stdin(Stdio::null())
    .stderr(Stdio::null());
    qemu.output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("detour-guest: probe ok"))
}

fn boot(kernel: Kernel, unpacked: &Unpacked, suite: &Suite, extra: &[String]) -> Result<KernelRun> {
    let dir = kernels_dir().join(kernel.series);
    let initrd = dir.join("initramfs.gz");
    initramfs(unpacked, suite, &suite_script(suite, extra), &initrd)?;
    let (accel, cpu) = if kvm_boots(unpacked, &initrd) {
        ("kvm", "host")
    } else {
        ("tcg", "max")
    };
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args(["-accel", accel, "-cpu", cpu, "-smp", "2", "-m", "2048"])
        .args(["-nographic", "-no-reboot", "-net", "none"])
        .arg("-kernel")
        .arg(&unpacked.vmlinuz)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
        .args([
            "-virtfs",
            "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    eprintln!("kernel {}: $ {}", kernel.series, cmd::display(&qemu));
    let started = Instant::now();
    let mut child = qemu
        .spawn()
        .context("starting qemu-system-x86_64 (`cargo xtask setup` installs it)")?;
    let stdout = child.stdout.take().context("qemu's stdout")?;
    // The watchdog: the guest's own suite has timeouts, but a hung kernel has none.
    let pid = child.id();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if done_rx.recv_timeout(GUEST_TIMEOUT).is_err() {
            // SAFETY: signalling the qemu child we started (still ours: not reaped).
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            return true;
        }
        false
    });
    let mut log = fs::File::create(dir.join("console.log"))?;
    let mut run = KernelRun {
        series: kernel.series.to_owned(),
        release: unpacked.release.clone(),
        accel,
        ..KernelRun::default()
    };
    let mut out = std::io::stdout().lock();
    for line in BufReader::new(stdout).split(b'\n') {
        let line = String::from_utf8_lossy(&line?)
            .trim_end_matches('\r')
            .to_owned();
        writeln!(log, "{:>7.1}s {line}", started.elapsed().as_secs_f64())?;
        writeln!(out, "[{}] {line}", kernel.series)?;
        parse_line(&line, &mut run);
    }
    let status = child.wait()?;
    let _ = done_tx.send(());
    let killed = watchdog.join().unwrap_or(false);
    run.elapsed = started.elapsed();
    if killed {
        run.problem = Some(format!("the guest did not finish within {GUEST_TIMEOUT:?}"));
    } else if !status.success() {
        run.problem = Some(format!("qemu exited with {status}"));
    } else if run.exit.is_none() {
        run.problem = Some("the guest never reported the suite's exit".into());
    } else if run.passed.is_empty() {
        run.problem = Some("no test passed".into());
    }
    Ok(run)
}

/// Reads one console line into `run`.
fn parse_line(line: &str, run: &mut KernelRun) {
    if line.starts_with("detour-guest: kernel ") {
        run.booted = true;
    } else if let Some(code) = line.strip_prefix("detour-guest: exit ") {
        run.exit = code.trim().parse().ok();
    } else if let Some(rest) = line.strip_prefix("test ") {
        if let Some((name, verdict)) = rest.rsplit_once(" ... ") {
            match verdict.trim() {
                "ok" => run.passed.push(name.to_owned()),
                "FAILED" => run.failed.push(name.to_owned()),
                v if v.starts_with("ignored") => run.ignored += 1,
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_lines_make_the_verdict() {
        let mut run = KernelRun::default();
        parse_line(
            "[    1.1] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI",
            &mut run,
        );
        assert!(!run.booted, "a kernel line is not the guest's init");
        for line in [
            "[    1.2] random kernel line",
            "detour-guest: kernel 6.12.117+deb13-amd64",
            "test passive::a ... ok\r",
            "test passive::b ... FAILED",
            "test demo::client ... ignored, helper process",
            "test scenarios::c has a ... in its name ... ok",
            "detour-guest: exit 101",
        ] {
            parse_line(line.trim_end_matches('\r'), &mut run);
        }
        assert_eq!(
            run.passed,
            ["passive::a", "scenarios::c has a ... in its name"]
        );
        assert_eq!(run.failed, ["passive::b"]);
        assert_eq!(run.ignored, 1);
        assert_eq!(run.exit, Some(101));
        assert!(run.booted);
        assert!(!run.ok());
    }

    #[test]
    fn the_suite_script_quotes_what_it_passes() {
        let suite = Suite {
            e2e: "/w/target/debug/deps/e2e-1".into(),
            variant: "/w/target/upgrade-variant/debug/detour".into(),
            k8s_assets: Some("/w/it's here".into()),
        };
        let script = suite_script(&suite, &["--skip".into(), "kube".into()]);
        assert!(
            script.contains("export KUBEBUILDER_ASSETS='/w/it'\\''s here'\n"),
            "{script}"
        );
        assert!(script.ends_with("'/w/target/debug/deps/e2e-1' '--test-threads' '1' '--color' 'never' '--skip' 'kube'\n"), "{script}");
    }
}
