//! Text templates such as `"{gene} {chrom}:{pos} {ref}>{alt} {consequence}"`.
//!
//! A template is parsed once into literal and field parts, so rendering a row is a
//! sequence of appends with no re-parsing. `{{` and `}}` are literal braces. A field the
//! row lacks (or holds empty) renders as nothing, with the separator before it: variant
//! annotations are sparse, and an absent SIFT score must neither fail a record nor leave
//! a doubled space in its text; whether a field *name* exists at all is checked once, against
//! the schema, with [`Template::fields`].

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Field(String),
}

/// A template that does not parse, with the byte offset of the problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("template {template:?}: {what} at byte {at}")]
pub struct TemplateError {
    pub template: String,
    pub what: &'static str,
    pub at: usize,
}

impl Template {
    pub fn parse(template: &str) -> Result<Self, TemplateError> {
        let err = |what, at| TemplateError {
            template: template.to_string(),
            what,
            at,
        };
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut chars = template.char_indices().peekable();
        while let Some((i, c)) = chars.next() {
            match c {
                '{' if chars.peek().map(|p| p.1) == Some('{') => {
                    chars.next();
                    literal.push('{');
                }
                '}' if chars.peek().map(|p| p.1) == Some('}') => {
                    chars.next();
                    literal.push('}');
                }
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some((_, '}')) => break,
                            Some((j, '{')) => return Err(err("'{' inside a field name", j)),
                            Some((_, ch)) => name.push(ch),
                            None => return Err(err("unclosed '{'", i)),
                        }
                    }
                    let name = name.trim();
                    if name.is_empty() {
                        return Err(err("empty field name", i));
                    }
                    if !literal.is_empty() {
                        parts.push(Part::Literal(std::mem::take(&mut literal)));
                    }
                    parts.push(Part::Field(name.to_string()));
                }
                '}' => return Err(err("unmatched '}'", i)),
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        if !parts.iter().any(|p| matches!(p, Part::Field(_))) {
            return Err(err("no {field} in template", 0));
        }
        Ok(Self { parts })
    }

    /// The field names the template uses, in order of first use.
    pub fn fields(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for p in &self.parts {
            if let Part::Field(name) = p
                && !out.contains(&name.as_str())
            {
                out.push(name);
            }
        }
        out
    }

    /// Appends the rendering to `out`; `value(name)` gives a field's text, `None` or `""`
    /// = missing. A missing field takes the literal before it with it (the separator or
    /// label between it and the field before), and the first field written drops the
    /// literal before it when no field was written yet, so that sparse annotations give
    /// `chr1:877772 G>C`, never `" chr1:877772 G>C    "`. The literals before the first
    /// field and after the last are always written.
    pub fn render_into<'a>(
        &self,
        out: &mut String,
        mut value: impl FnMut(&str) -> Option<&'a str>,
    ) {
        let last_field = self
            .parts
            .iter()
            .rposition(|p| matches!(p, Part::Field(_)))
            .expect("a template has a field");
        let mut written = false;
        let mut pending: Option<&str> = None;
        let mut seen_field = false;
        for (i, p) in self.parts.iter().enumerate() {
            match p {
                Part::Literal(s) if !seen_field || i > last_field => out.push_str(s),
                Part::Literal(s) => pending = Some(s),
                Part::Field(name) => {
                    seen_field = true;
                    let before = pending.take();
                    if let Some(v) = value(name).filter(|v| !v.is_empty()) {
                        if written && let Some(sep) = before {
                            out.push_str(sep);
                        }
                        out.push_str(v);
                        written = true;
                    }
                }
            }
        }
    }

    pub fn render<'a>(&self, value: impl FnMut(&str) -> Option<&'a str>) -> String {
        let mut out = String::new();
        self.render_into(&mut out, value);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_fields_and_literals() {
        let t = Template::parse("{gene} {chrom}:{pos} {ref}>{alt}").unwrap();
        assert_eq!(t.fields(), vec!["gene", "chrom", "pos", "ref", "alt"]);
        let s = t.render(|k| match k {
            "gene" => Some("BRCA1"),
            "chrom" => Some("chr17"),
            "pos" => Some("43045712"),
            "ref" => Some("A"),
            "alt" => None,
            _ => unreachable!(),
        });
        assert_eq!(
            s, "BRCA1 chr17:43045712 A",
            "a missing field takes its separator"
        );
    }

    #[test]
    fn missing_fields_leave_no_stray_separators() {
        let t = Template::parse(
            "{gene} {chrom}:{pos} {ref}>{alt} {consequence} {amino_acids} {sift} {polyphen}",
        )
        .unwrap();
        let site = |k: &str| match k {
            "chrom" => Some("chr1"),
            "pos" => Some("877772"),
            "ref" => Some("G"),
            "alt" => Some("C"),
            "sift" => Some(""),
            _ => None,
        };
        assert_eq!(t.render(site), "chr1:877772 G>C");
        let some = |k: &str| match k {
            "gene" => Some("SAMD11"),
            "polyphen" => Some("benign(0)"),
            k => site(k),
        };
        assert_eq!(t.render(some), "SAMD11 chr1:877772 G>C benign(0)");
        // What is around the fields is kept; a template of one missing field is empty.
        let t = Template::parse("[{gene}|{consequence}]").unwrap();
        assert_eq!(
            t.render(|k| (k == "consequence").then_some("stop_gained")),
            "[stop_gained]"
        );
        assert_eq!(t.render(|_| None), "[]");
    }

    #[test]
    fn braces_escape_and_errors_point_at_the_problem() {
        let t = Template::parse("{{x}} {a}").unwrap();
        assert_eq!(t.render(|_| Some("1")), "{x} 1");
        assert_eq!(Template::parse("{a").unwrap_err().what, "unclosed '{'");
        assert_eq!(Template::parse("a}").unwrap_err().at, 1);
        assert_eq!(Template::parse("{ }").unwrap_err().what, "empty field name");
        assert_eq!(
            Template::parse("plain").unwrap_err().what,
            "no {field} in template"
        );
        assert_eq!(
            Template::parse("{a{b}").unwrap_err().what,
            "'{' inside a field name"
        );
    }
}
