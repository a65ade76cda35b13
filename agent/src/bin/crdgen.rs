//! Prints the `FailoverService` CustomResourceDefinition as YAML on stdout.
//!
//! `cargo xtask crd` runs it and writes `deploy/crds/failoverservice.yaml`; a unit test in
//! `sources::kubernetes::failover_service` fails when that file differs from this output.

use std::io::Write as _;
use std::process::ExitCode;

fn main() -> ExitCode {
    match detour_agent::sources::kubernetes::failover_service::crd_yaml() {
        Ok(yaml) => match std::io::stdout().write_all(yaml.as_bytes()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("error: writing the CRD to stdout: {error}");
                ExitCode::FAILURE
            }
        },
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}
