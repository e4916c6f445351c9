//! How the command-line tools print an error: the error and its causes on one line.

/// The error and its causes on one line, leaving out a cause whose text the message before it
/// already holds (the library errors name their source in their own message). The tools print
/// no backtrace: these are reports of bad input, not crashes.
pub fn error_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = String::new();
    let mut last = String::new();
    let mut cause = Some(e);
    while let Some(c) = cause {
        let t = c.to_string();
        if !last.contains(&t) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&t);
            last = t;
        }
        cause = c.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::error_text;

    #[derive(Debug, thiserror::Error)]
    #[error("inner {0}")]
    struct Inner(u32);

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("reading x: {0}")]
        Named(#[source] Inner),
        #[error("reading y")]
        Unnamed(#[source] Inner),
    }

    #[test]
    fn a_cause_the_message_holds_is_not_repeated() {
        assert_eq!(error_text(&Outer::Named(Inner(3))), "reading x: inner 3");
        assert_eq!(error_text(&Outer::Unnamed(Inner(4))), "reading y: inner 4");
    }
}
