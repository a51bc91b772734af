//! Command-line flags for the examples: `--flag value`, `--flag=value` and bare switches, in
//! order, with errors that end in the usage line.

pub(crate) struct Flags {
    args: std::vec::IntoIter<String>,
    usage: &'static str,
}

impl Flags {
    /// The process's arguments (without the program name).
    pub(crate) fn from_env(usage: &'static str) -> Self {
        Self {
            args: std::env::args().skip(1).collect::<Vec<_>>().into_iter(),
            usage,
        }
    }

    /// The next flag, and its value if it was written `--flag=value`.
    pub(crate) fn next_flag(&mut self) -> Option<(String, Option<String>)> {
        let arg = self.args.next()?;
        Some(match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => {
                (flag.to_owned(), Some(value.to_owned()))
            }
            _ => (arg, None),
        })
    }

    /// The value of `flag`: the inline one, else the next argument.
    pub(crate) fn value(&mut self, flag: &str, inline: Option<String>) -> Result<String, String> {
        inline
            .or_else(|| self.args.next())
            .ok_or_else(|| format!("{flag} needs a value; {}", self.usage))
    }

    /// The error for an argument nobody knows (or `--help`).
    pub(crate) fn unknown(&self, flag: &str) -> String {
        match flag {
            "--help" | "-h" => self.usage.to_owned(),
            other => format!("unknown argument {other:?}; {}", self.usage),
        }
    }
}
