//! What a stream asks for, read once from its first message's `FlightDescriptor`.
//!
//! - path `["embed"]` (or `["embed", CMD]`, or a `Cmd` descriptor): rows come back with
//!   their vectors (`DoExchange`);
//! - path `["datasets", NAME]` (or `["datasets", NAME, CMD]`): rows are stored (`DoPut`).
//!
//! `CMD` is the JSON command of [`crate::text::EmbedCommand`] (or the descriptor's `cmd`).

use arrow_flight::FlightDescriptor;
use arrow_flight::flight_descriptor::DescriptorType;

use crate::WireError;
use crate::text::{EmbedCommand, TextSource};
use crate::vectors::VectorPrecision;

/// What a stream's descriptor asks for.
#[derive(Debug, Clone)]
pub enum Target {
    /// Vectors back to the client, row for row.
    Embed(Request),
    /// Rows appended to the named dataset.
    Dataset(String, Request),
}

/// Which text each row is embedded as, and how its vector is written (unset: the
/// configured defaults).
#[derive(Debug, Clone)]
pub struct Request {
    pub source: TextSource,
    pub precision: Option<VectorPrecision>,
    pub dimensions: Option<usize>,
    /// `"DATASET/NAME"`: a PCA projection the vectors go through.
    pub projection: Option<String>,
    /// `DoPut`: the rows the dataset must hold at this stream's first append.
    pub expect_rows: Option<u64>,
}

impl Target {
    /// The text source, whatever the target.
    pub fn source(&self) -> &TextSource {
        &self.request().source
    }

    pub fn request(&self) -> &Request {
        match self {
            Target::Embed(request) | Target::Dataset(_, request) => request,
        }
    }

    /// Parses a stream's descriptor; `default_column` is the text column when the command
    /// names none (`ingest.default_text_column`).
    pub fn parse(d: Option<&FlightDescriptor>, default_column: &str) -> Result<Self, WireError> {
        let d =
            d.ok_or_else(|| WireError::invalid("the first message carries no flight descriptor"))?;
        let source = |cmd: &[u8]| {
            let c = EmbedCommand::parse(cmd)?;
            if let Some(p) = &c.projection {
                let named = p
                    .split_once('/')
                    .is_some_and(|(d, n)| is_valid_dataset_name(d) && is_valid_dataset_name(n));
                if !named {
                    return Err(WireError::Invalid(format!(
                        "bad command: projection {p:?} must be \"DATASET/NAME\" (made by keel reduce)"
                    )));
                }
            }
            Ok::<_, WireError>(Request {
                source: TextSource::from_command(&c, default_column)?,
                precision: c.precision,
                dimensions: c.dimensions,
                projection: c.projection,
                expect_rows: c.expect_rows,
            })
        };
        let embed = |request: Request| {
            if request.expect_rows.is_some() {
                return Err(WireError::invalid(
                    "bad command: expect_rows is for DoPut [\"datasets\", NAME] only",
                ));
            }
            Ok(Target::Embed(request))
        };
        match DescriptorType::try_from(d.r#type) {
            Ok(DescriptorType::Path) => {
                let path: Vec<&str> = d.path.iter().map(String::as_str).collect();
                match path.as_slice() {
                    ["embed"] => embed(source(&d.cmd)?),
                    ["embed", cmd] => embed(source(cmd.as_bytes())?),
                    ["datasets", name] => Ok(Target::Dataset(
                        checked_dataset_name(name)?.to_string(),
                        source(&d.cmd)?,
                    )),
                    ["datasets", name, cmd] => Ok(Target::Dataset(
                        checked_dataset_name(name)?.to_string(),
                        source(cmd.as_bytes())?,
                    )),
                    _ => Err(WireError::Invalid(format!(
                        "unknown descriptor path {path:?}; use [\"embed\"] or [\"datasets\", NAME]"
                    ))),
                }
            }
            Ok(DescriptorType::Cmd) => embed(source(&d.cmd)?),
            _ => Err(WireError::invalid("unknown descriptor type")),
        }
    }
}

/// The dataset a `GetFlightInfo` / `GetSchema` descriptor names (path `["datasets", NAME]`).
pub fn dataset_of(d: &FlightDescriptor) -> Result<&str, WireError> {
    match d.path.as_slice() {
        [kind, name] if kind == "datasets" => checked_dataset_name(name),
        _ => Err(WireError::invalid(
            "expected the descriptor path [\"datasets\", NAME]",
        )),
    }
}

/// A `DoGet` ticket: a dataset's name (all its rows), or JSON naming a range of its rows,
/// `{"dataset": NAME, "offset": 1000, "limit": 10}` (`offset` defaults to 0, `limit` to
/// the rest).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetTicket {
    pub dataset: String,
    #[serde(default)]
    pub offset: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
}

impl DatasetTicket {
    /// Parses a ticket: a plain name, or the JSON form.
    pub fn parse(ticket: &[u8]) -> Result<Self, WireError> {
        let text = std::str::from_utf8(ticket)
            .map_err(|_| WireError::invalid("the ticket is not UTF-8"))?;
        let ticket = if text.trim_start().starts_with('{') {
            serde_json::from_str(text).map_err(|e| {
                WireError::Invalid(format!(
                    "bad ticket JSON ({e}); expected a dataset name or {{\"dataset\": NAME, \"offset\": N, \"limit\": N}}"
                ))
            })?
        } else {
            Self {
                dataset: text.to_string(),
                offset: 0,
                limit: None,
            }
        };
        checked_dataset_name(&ticket.dataset)?;
        Ok(ticket)
    }
}

/// Whether `name` may name a dataset: 1–128 of `A–Z a–z 0–9 _ - .`, not starting with a
/// dot (a dataset is a folder; a name is never a path).
pub fn is_valid_dataset_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
}

/// `name` if it is a valid dataset name, else the error that says what a name may be.
pub fn checked_dataset_name(name: &str) -> Result<&str, WireError> {
    if is_valid_dataset_name(name) {
        Ok(name)
    } else {
        Err(WireError::Invalid(format!(
            "invalid dataset name {name:?}: use 1-128 characters of A-Z a-z 0-9 _ - . (not starting with '.')"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(p: &[&str]) -> FlightDescriptor {
        FlightDescriptor::new_path(p.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn paths_and_commands_become_targets() {
        assert!(matches!(
            Target::parse(Some(&path(&["embed"])), "text").unwrap(),
            Target::Embed(Request { source: TextSource::Column(c), precision: None, dimensions: None, .. }) if c == "text"
        ));
        assert!(matches!(
            Target::parse(Some(&path(&["embed", r#"{"text_column":"t"}"#])), "text").unwrap(),
            Target::Embed(Request { source: TextSource::Column(c), .. }) if c == "t"
        ));
        assert!(matches!(
            Target::parse(Some(&path(&["datasets", "v1"])), "text").unwrap(),
            Target::Dataset(n, _) if n == "v1"
        ));
        let cmd = FlightDescriptor::new_cmd(r#"{"template":"{gene}"}"#.as_bytes().to_vec());
        assert!(matches!(
            Target::parse(Some(&cmd), "text").unwrap(),
            Target::Embed(Request {
                source: TextSource::Template(_),
                ..
            })
        ));
        let compact = path(&["embed", r#"{"precision":"int8","dimensions":128}"#]);
        assert!(matches!(
            Target::parse(Some(&compact), "text").unwrap(),
            Target::Embed(Request {
                precision: Some(VectorPrecision::Int8),
                dimensions: Some(128),
                ..
            })
        ));
        let bad = path(&["embed", r#"{"precision":"int4"}"#]);
        let e = Target::parse(Some(&bad), "text").unwrap_err().to_string();
        assert!(
            e.contains("unknown variant `int4`") && e.contains("binary"),
            "{e}"
        );
    }

    #[test]
    fn bad_descriptors_say_what_is_expected() {
        let err = |d: Option<&FlightDescriptor>| Target::parse(d, "text").unwrap_err().to_string();
        assert!(err(None).contains("no flight descriptor"));
        assert!(err(Some(&path(&["nope"]))).contains("unknown descriptor path"));
        assert!(err(Some(&path(&["datasets", "../etc"]))).contains("invalid dataset name"));
        assert!(err(Some(&path(&["embed", "{bad"]))).contains("bad command JSON"));
        assert!(dataset_of(&path(&["embed"])).is_err());
        assert_eq!(
            dataset_of(&path(&["datasets", "a.b-c_1"])).unwrap(),
            "a.b-c_1"
        );
    }

    #[test]
    fn tickets_name_a_dataset_or_a_range_of_its_rows() {
        let t = DatasetTicket::parse(b"v1").unwrap();
        assert_eq!((t.dataset.as_str(), t.offset, t.limit), ("v1", 0, None));
        let t = DatasetTicket::parse(br#"{"dataset":"v1","offset":10,"limit":2}"#).unwrap();
        assert_eq!((t.dataset.as_str(), t.offset, t.limit), ("v1", 10, Some(2)));
        let back = DatasetTicket::parse(&serde_json::to_vec(&t).unwrap()).unwrap();
        assert_eq!(back, t);
        for bad in [
            &b"../x"[..],
            br#"{"dataset":"v1","offset":-1}"#,
            br#"{"dataset":"v1","rows":1}"#,
            b"{",
            &[0xff],
        ] {
            assert!(
                DatasetTicket::parse(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn dataset_names_are_never_paths() {
        for bad in ["", ".hidden", "a/b", "..", "a b", &"x".repeat(129)] {
            assert!(!is_valid_dataset_name(bad), "{bad:?}");
        }
        for good in ["v1", "chrX.2026-11", "A_b"] {
            assert!(is_valid_dataset_name(good), "{good:?}");
        }
    }
}
