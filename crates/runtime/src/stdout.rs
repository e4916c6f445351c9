//! Standard output for the command-line tools: a reader that stops early (`| head`, `| grep -m1`)
//! closes the pipe, which is the normal end of the output, not an error and never a panic
//! (`println!` panics on a closed pipe).

use std::io::Write;

/// Writes `args` and a newline to standard output; where the reader has closed the pipe the
/// process ends quietly with status 0, as the Unix tools do. Other write errors end it with
/// status 2 and a message.
pub fn line(args: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    finish(out.write_fmt(args).and_then(|()| out.write_all(b"\n")));
}

/// [`line()`] without the newline, flushed (streamed text).
pub fn text(args: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    finish(out.write_fmt(args).and_then(|()| out.flush()));
}

fn finish(r: std::io::Result<()>) {
    if let Err(e) = r {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: writing to standard output: {e}");
        std::process::exit(2);
    }
}

/// `print!` for the tools' standard output: see [`text`].
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::stdout::text(format_args!($($arg)*))
    };
}

/// `println!` for the tools' standard output: see [`line()`].
#[macro_export]
macro_rules! outln {
    () => {
        $crate::stdout::line(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::stdout::line(format_args!($($arg)*))
    };
}
