//! `textrefiner-explorer`: with no subcommand it opens the explorer (feature `gui`); the
//! subcommands run the same work headless.

use clap::Parser;

// candle allocates a fresh buffer per op; mimalloc keeps freed pages for reuse instead of
// returning them to the OS and faulting them in again (see BENCHMARKS.md for the effect).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "textrefiner-explorer",
    version,
    about = "Inspect, compare and fine-tune CLIP prompt learning (CoOp + TextRefiner)"
)]
struct Cli {
    /// Open the explorer on this model (folder, weights file or hub id).
    #[arg(long)]
    model: Option<String>,
    /// Open the explorer with these images (repeatable).
    #[arg(long = "image")]
    images: Vec<std::path::PathBuf>,
    #[command(subcommand)]
    command: Option<textrefiner_explorer::cli::Command>,
}

fn main() {
    // Keep freed pages instead of returning them to the OS after 10 ms (mimalloc's default):
    // candle allocates every op's output afresh, and training steps otherwise spend ~10% of
    // their time in the kernel zeroing pages faulted in again (measured with perf, BENCHMARKS.md).
    // SAFETY: called before any other thread exists; option 15 is `mi_option_purge_delay` in
    // mimalloc v2 and v3, and -1 means "never purge".
    unsafe { libmimalloc_sys::mi_option_set(15, -1) };
    let cli = Cli::parse();
    let result = match cli.command {
        Some(cmd) => textrefiner_explorer::cli::run(cmd),
        None => open_explorer(cli.model, cli.images),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

#[cfg(feature = "gui")]
fn open_explorer(model: Option<String>, images: Vec<std::path::PathBuf>) -> anyhow::Result<()> {
    textrefiner_explorer::app::run_native(textrefiner_explorer::app::StartOptions { model, images })
}

#[cfg(not(feature = "gui"))]
fn open_explorer(_model: Option<String>, _images: Vec<std::path::PathBuf>) -> anyhow::Result<()> {
    anyhow::bail!(
        "this build has no GUI (built without the `gui` feature); run a subcommand, see --help"
    )
}
