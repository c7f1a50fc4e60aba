//! Progress bars on stderr (one per disk: bytes scanned, throughput, ETA, bytes sent), hidden
//! when stderr is not a terminal or with `--no-progress`; and a log writer that keeps log
//! lines from tearing the bars.

use std::io::{IsTerminal, Write};
use std::sync::OnceLock;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

static MULTI: OnceLock<MultiProgress> = OnceLock::new();

/// The process's progress display (hidden until [`enable`] is called).
fn multi() -> &'static MultiProgress {
    MULTI.get_or_init(|| MultiProgress::with_draw_target(ProgressDrawTarget::hidden()))
}

/// Shows progress bars on stderr if `wanted` and stderr is a terminal. Returns whether they
/// are shown.
pub fn enable(wanted: bool) -> bool {
    let on = wanted && std::io::stderr().is_terminal();
    if on {
        multi().set_draw_target(ProgressDrawTarget::stderr());
    }
    on
}

/// A progress bar for one disk.
pub fn disk_bar(disk: &str, size: u64) -> ProgressBar {
    let style = ProgressStyle::with_template(
        "{prefix:>8} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta} {msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    let bar = multi().add(
        ProgressBar::new(size)
            .with_style(style)
            .with_prefix(disk.to_owned()),
    );
    bar.enable_steady_tick(Duration::from_millis(250));
    bar
}

/// A `tracing` writer to stderr that hides the bars while a line is written.
#[derive(Debug, Clone, Copy, Default)]
pub struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        multi().suspend(|| std::io::stderr().write_all(buf))?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogWriter;
    fn make_writer(&'a self) -> Self::Writer {
        *self
    }
}
