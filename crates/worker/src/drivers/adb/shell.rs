//! Device command lines. `adb shell` joins its arguments with spaces and the phone's
//! `sh` parses the result, so an argument is only ever one argument on the device if it
//! is quoted for that shell. Every line the driver sends is built here, word by word,
//! each word quoted: a message body such as `hi; reboot $(id)` reaches the device as
//! one argument, unchanged, and runs nothing.

/// Quotes one word for a POSIX shell (Android's `mksh`/`toybox sh`): words made only
/// of characters no shell gives a meaning to stay bare, anything else goes inside
/// single quotes, where nothing is special but the quote itself, written `'\''`.
pub fn quote(word: &str) -> String {
    let plain = !word.is_empty() && word.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./:=@%+,".contains(&b));
    if plain { word.to_string() } else { format!("'{}'", word.replace('\'', r"'\''")) }
}

/// A command line for the device, one quoted word at a time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line(Vec<String>);

impl Line {
    /// A line running `program` (a fixed name, never user input).
    pub fn new(program: &str) -> Line {
        Line(vec![quote(program)])
    }

    /// Adds one argument.
    pub fn arg(mut self, word: impl AsRef<str>) -> Line {
        self.0.push(quote(word.as_ref()));
        self
    }

    /// Adds several arguments.
    pub fn args<S: AsRef<str>>(mut self, words: impl IntoIterator<Item = S>) -> Line {
        self.0.extend(words.into_iter().map(|w| quote(w.as_ref())));
        self
    }

    /// The line as the device's shell will read it.
    pub fn render(&self) -> String {
        self.0.join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny POSIX word splitter (quotes and backslashes only), enough to check that
    /// each rendered word comes back as exactly the word it was.
    fn split(line: &str) -> Vec<String> {
        let (mut words, mut cur, mut in_word) = (Vec::new(), String::new(), false);
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            match c {
                '\'' => {
                    in_word = true;
                    for q in chars.by_ref() {
                        if q == '\'' {
                            break;
                        }
                        cur.push(q);
                    }
                }
                '\\' => {
                    in_word = true;
                    cur.extend(chars.next());
                }
                ' ' if in_word => {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
                ' ' => {}
                c => {
                    assert!(!";&|$`\"<>()*?#~\n".contains(c), "unquoted metacharacter {c:?} in {line}");
                    in_word = true;
                    cur.push(c);
                }
            }
        }
        if in_word {
            words.push(cur);
        }
        words
    }

    #[test]
    fn every_word_survives_the_device_shell() {
        let hostile = [
            "hi; reboot $(id)",
            "it's",
            "`id`",
            "a\nb",
            "\"quoted\"",
            "",
            " ",
            "$HOME",
            "a'b'c",
            "*",
            "x && y || z | w > /data/f",
            "tel:+33612345678",
        ];
        let line = Line::new("service").args(["call", "isms", "7"]).args(hostile);
        let words = split(&line.render());
        assert_eq!(words[..4], ["service", "call", "isms", "7"]);
        assert_eq!(words[4..], hostile);
    }

    #[test]
    fn plain_words_stay_readable() {
        assert_eq!(Line::new("ping").args(["-c", "4", "-i", "0.2", "8.8.8.8"]).render(), "ping -c 4 -i 0.2 8.8.8.8");
        assert_eq!(quote("hi there"), "'hi there'");
        assert_eq!(quote("it's"), r"'it'\''s'");
    }
}
