//! `barrage`: one binary, a subcommand per role (`controller`,
//! `push-manager`, `connect-node`), `dev` (all roles in one process), and
//! `sub` (a terminal subscriber), `token` and `bench` (a load test). Parses the command line and environment,
//! builds the configuration, runs.

mod bandwidth;
mod bench;
mod cli;
mod idle;
mod launch;
mod reader;
mod sub;

use std::process::ExitCode;

use clap::Parser;

/// mimalloc instead of glibc's allocator: fewer contended arena locks on the
/// push path (measured in BENCHMARKS.md; build with
/// `--no-default-features` for glibc's).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Turns transparent huge pages off for this process (and its children),
/// before the runtime allocates anything of note. On a fresh heap page the
/// kernel zeroes the whole huge page at the first touch, and on virtual
/// machines whose memory is not backed yet that took 6 ms at a time here,
/// with every task of the process waiting (BENCHMARKS.md).
#[cfg(target_os = "linux")]
fn disable_huge_pages() -> std::io::Result<()> {
    rustix::thread::disable_transparent_huge_pages(true).map_err(Into::into)
}

#[cfg(not(target_os = "linux"))]
fn disable_huge_pages() -> std::io::Result<()> {
    Ok(())
}

/// Exit code for bad configuration (EX_USAGE).
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let cli = match cli::Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp
                | clap::error::ErrorKind::DisplayVersion
                | clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
                    ExitCode::SUCCESS
                }
                _ => ExitCode::from(EXIT_CONFIG),
            };
        }
    };
    let flavor = cli.runtime_flavor();
    let workers = cli.worker_threads();
    if cli.huge_pages() == cli::HugePages::Off
        && let Err(e) = disable_huge_pages()
    {
        eprintln!(
            "warning: TRANSPARENT_HUGE_PAGES=off: the kernel refused it ({e}); using its setting"
        );
    }
    let plan = match cli.into_plan() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let mut builder = match flavor {
        cli::RuntimeFlavor::MultiThread => tokio::runtime::Builder::new_multi_thread(),
        cli::RuntimeFlavor::CurrentThread => tokio::runtime::Builder::new_current_thread(),
    };
    if let Some(n) = workers {
        builder.worker_threads(n);
    }
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(launch::run(plan)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
