//! Which text each row stands for.
//!
//! A stream's command (JSON in the Flight descriptor's `cmd`, or nothing) names a text
//! column or a template over columns. [`TextSource::bind`] checks it against the stream's
//! schema once: a missing column, a column that is not text, or a template field the
//! schema lacks is an `InvalidArgument` naming it, before any row is read.

use std::sync::Arc;

use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_cast::display::{ArrayFormatter, FormatOptions};
use arrow_schema::{DataType, Schema};
use serde::{Deserialize, Serialize};

use crate::WireError;
use crate::template::Template;

/// The JSON command of an `embed` exchange or a dataset put.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbedCommand {
    /// Column holding the text (default `ingest.default_text_column`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_column: Option<String>,
    /// A template over columns, e.g. `"{gene} {chrom}:{pos} {ref}>{alt}"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// The vectors' number type (default `ingest.default_precision`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precision: Option<crate::vectors::VectorPrecision>,
    /// The vectors' dimensions, at most the model's (default `ingest.default_dimensions`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dimensions: Option<usize>,
    /// A PCA projection fitted by `keel reduce`, `"DATASET/NAME"`: the vectors are
    /// projected to its dimensions (instead of cut).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub projection: Option<String>,
    /// `DoPut` only: the rows the dataset must hold when this stream's first rows are
    /// appended (and then each append's own count), else the stream ends with
    /// FailedPrecondition and nothing of it is appended. A producer that resends from the
    /// dataset's count after a lost connection sets it, so that rows of its earlier
    /// connection landing late are never followed by the same rows again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect_rows: Option<u64>,
}

impl EmbedCommand {
    /// The command as a client sends it (JSON; `{}` for all defaults).
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a command serialises")
    }

    /// Parses a command; empty bytes mean "all defaults".
    pub fn parse(bytes: &[u8]) -> Result<Self, WireError> {
        if bytes.iter().all(|b| b.is_ascii_whitespace()) {
            return Ok(Self::default());
        }
        let cmd: Self = serde_json::from_slice(bytes)
            .map_err(|e| WireError::Invalid(format!("bad command JSON: {e}")))?;
        if cmd.projection.is_some() && cmd.dimensions.is_some() {
            return Err(WireError::Invalid(
                "bad command: give dimensions or projection, not both (a projection has its own)"
                    .into(),
            ));
        }
        if cmd.text_column.is_some() && cmd.template.is_some() {
            return Err(WireError::Invalid(
                "bad command: give text_column or template, not both".into(),
            ));
        }
        Ok(cmd)
    }
}

/// How a row's text is made: unbound (from the command) until the schema is known.
#[derive(Debug, Clone)]
pub enum TextSource {
    Column(String),
    Template(Arc<Template>),
}

impl TextSource {
    pub fn from_command(cmd: &EmbedCommand, default_column: &str) -> Result<Self, WireError> {
        match (&cmd.template, &cmd.text_column) {
            (Some(t), _) => Template::parse(t)
                .map(|t| Self::Template(Arc::new(t)))
                .map_err(|e| WireError::Invalid(format!("bad template: {e}"))),
            (None, Some(c)) => Ok(Self::Column(c.clone())),
            (None, None) => Ok(Self::Column(default_column.to_string())),
        }
    }

    /// Checks the source against a schema.
    pub fn bind(&self, schema: &Schema) -> Result<(), WireError> {
        let names = || {
            schema
                .fields()
                .iter()
                .map(|f| f.name().as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        // The names Keel adds: an input column of either would be shadowed (readers by
        // name take the first of two), or give an int8 stream's vectors wrong scales.
        for added in ["embedding", crate::vectors::SCALE_COLUMN] {
            if schema.column_with_name(added).is_some() {
                return Err(WireError::Invalid(format!(
                    "the input already has an {added:?} column, a name Keel adds; rename or drop it"
                )));
            }
        }
        match self {
            Self::Column(c) => {
                let (_, field) = schema.column_with_name(c).ok_or_else(|| {
                    WireError::Invalid(format!(
                        "text column {c:?} not found; columns: [{}]",
                        names()
                    ))
                })?;
                if !is_text(field.data_type()) {
                    return Err(WireError::Invalid(format!(
                        "text column {c:?} has type {}, expected Utf8, LargeUtf8, Utf8View or a dictionary of them",
                        field.data_type()
                    )));
                }
            }
            Self::Template(t) => {
                for f in t.fields() {
                    if schema.column_with_name(f).is_none() {
                        return Err(WireError::Invalid(format!(
                            "template field {{{f}}} is not a column; columns: [{}]",
                            names()
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    /// The text of every row of `batch` (already bound); `None` where the text is null.
    pub fn texts(&self, batch: &RecordBatch) -> Result<Vec<Option<String>>, WireError> {
        match self {
            Self::Column(c) => {
                let col = batch
                    .column_by_name(c)
                    .ok_or_else(|| WireError::Invalid(format!("text column {c:?} not found")))?;
                string_values(col)
            }
            Self::Template(t) => {
                let opts = FormatOptions::default();
                let fields = t.fields();
                let mut columns = Vec::with_capacity(fields.len());
                for f in &fields {
                    let col = batch.column_by_name(f).ok_or_else(|| {
                        WireError::Invalid(format!("template field {{{f}}} is not a column"))
                    })?;
                    columns.push(col.clone());
                }
                let mut formatters = Vec::with_capacity(fields.len());
                for col in &columns {
                    formatters.push(
                        ArrayFormatter::try_new(col.as_ref(), &opts).map_err(|e| {
                            WireError::Invalid(format!("cannot format column: {e}"))
                        })?,
                    );
                }
                let mut out = Vec::with_capacity(batch.num_rows());
                let mut cells: Vec<String> = vec![String::new(); fields.len()];
                for row in 0..batch.num_rows() {
                    for (i, (fmt, col)) in formatters.iter().zip(&columns).enumerate() {
                        cells[i].clear();
                        if col.is_valid(row) {
                            use std::fmt::Write;
                            let _ = write!(cells[i], "{}", fmt.value(row));
                        }
                    }
                    out.push(Some(t.render(|name| {
                        fields
                            .iter()
                            .position(|f| *f == name)
                            .map(|i| cells[i].as_str())
                    })));
                }
                Ok(out)
            }
        }
    }
}

fn is_text(dt: &DataType) -> bool {
    match dt {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => true,
        DataType::Dictionary(_, v) => matches!(
            v.as_ref(),
            DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
        ),
        _ => false,
    }
}

fn string_values(col: &ArrayRef) -> Result<Vec<Option<String>>, WireError> {
    let utf8 = arrow_cast::cast(col, &DataType::Utf8)
        .map_err(|e| WireError::Invalid(format!("text column cannot be read as text: {e}")))?;
    let strings = utf8
        .as_any()
        .downcast_ref::<arrow_array::StringArray>()
        .ok_or_else(|| WireError::Internal("cast to Utf8 did not give a StringArray".into()))?;
    Ok(strings.iter().map(|s| s.map(str::to_string)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::{DictionaryArray, Int64Array, StringArray, types::Int32Type};

    fn batch() -> RecordBatch {
        RecordBatch::try_from_iter([
            (
                "text",
                Arc::new(StringArray::from(vec![Some("a"), None, Some("c")])) as ArrayRef,
            ),
            (
                "gene",
                Arc::new(StringArray::from(vec![Some("BRCA1"), Some("TP53"), None])) as ArrayRef,
            ),
            ("pos", Arc::new(Int64Array::from(vec![1, 2, 3])) as ArrayRef),
        ])
        .unwrap()
    }

    #[test]
    fn column_texts_keep_nulls() {
        let b = batch();
        let s = TextSource::from_command(&EmbedCommand::default(), "text").unwrap();
        s.bind(&b.schema()).unwrap();
        assert_eq!(
            s.texts(&b).unwrap(),
            vec![Some("a".into()), None, Some("c".into())]
        );
    }

    #[test]
    fn templates_format_any_column_and_drop_null_fields_with_their_separator() {
        let b = batch();
        let cmd = EmbedCommand::parse(br#"{"template": "{gene}:{pos}"}"#).unwrap();
        let s = TextSource::from_command(&cmd, "text").unwrap();
        s.bind(&b.schema()).unwrap();
        assert_eq!(
            s.texts(&b).unwrap(),
            vec![
                Some("BRCA1:1".into()),
                Some("TP53:2".into()),
                Some("3".into())
            ]
        );
    }

    #[test]
    fn dictionary_text_columns_are_read() {
        let dict: DictionaryArray<Int32Type> = vec![Some("x"), Some("y"), None, Some("x")]
            .into_iter()
            .collect();
        let b = RecordBatch::try_from_iter([("text", Arc::new(dict) as ArrayRef)]).unwrap();
        let s = TextSource::Column("text".into());
        s.bind(&b.schema()).unwrap();
        assert_eq!(
            s.texts(&b).unwrap(),
            vec![Some("x".into()), Some("y".into()), None, Some("x".into())]
        );
    }

    #[test]
    fn bad_commands_and_schemas_name_the_problem() {
        let b = batch();
        let err = |r: Result<(), WireError>| r.unwrap_err().to_string();
        assert!(
            err(TextSource::Column("nope".into()).bind(&b.schema())).contains("\"nope\" not found")
        );
        assert!(err(TextSource::Column("pos".into()).bind(&b.schema())).contains("has type Int64"));
        let t = TextSource::from_command(
            &EmbedCommand::parse(br#"{"template":"{gene} {alt}"}"#).unwrap(),
            "text",
        )
        .unwrap();
        assert!(err(t.bind(&b.schema())).contains("{alt}"));
        assert!(
            EmbedCommand::parse(b"{not json")
                .unwrap_err()
                .to_string()
                .contains("bad command JSON")
        );
        assert!(
            EmbedCommand::parse(br#"{"text_colum": "x"}"#)
                .unwrap_err()
                .to_string()
                .contains("text_colum")
        );
        assert!(
            TextSource::from_command(&EmbedCommand::parse(br#"{"template":"{a"}"#).unwrap(), "t")
                .is_err()
        );
    }
}
