//! The prompt format a causal LM was tuned for. An instruct checkpoint ships a Jinja chat
//! template (`chat_template.jinja`, or `chat_template` in `tokenizer_config.json`); training and
//! generation must wrap text in it exactly as transformers' `apply_chat_template` does, or the
//! adapter learns a format production never sends. Base models without one get `prompt\n`.

use std::path::Path;

use minijinja::{Environment, Error, ErrorKind, Value, context};

use crate::error::{Result, TrainerError, io_err};

/// A checkpoint's chat template and the special tokens it refers to.
pub(crate) struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    file: std::path::PathBuf,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
}

/// The text before the completion and the completion as the model should produce it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Rendered {
    pub prompt: String,
    pub completion: String,
}

impl ChatTemplate {
    /// The template in `dir`, if the checkpoint has one.
    pub fn load(dir: &Path) -> Result<Option<Self>> {
        let config_path = dir.join("tokenizer_config.json");
        let config: serde_json::Value = if config_path.exists() {
            let raw = std::fs::read_to_string(&config_path).map_err(io_err(&config_path))?;
            serde_json::from_str(&raw).map_err(|e| TrainerError::BadFile {
                file: config_path.clone(),
                message: e.to_string(),
            })?
        } else {
            serde_json::Value::Null
        };
        let jinja = dir.join("chat_template.jinja");
        let (source, file) = if jinja.exists() {
            (
                std::fs::read_to_string(&jinja).map_err(io_err(&jinja))?,
                jinja,
            )
        } else {
            match &config["chat_template"] {
                serde_json::Value::String(s) => (s.clone(), config_path),
                // Several named templates: the default one is the chat format.
                serde_json::Value::Array(named) => match named
                    .iter()
                    .find(|t| t["name"] == "default")
                    .and_then(|t| t["template"].as_str())
                {
                    Some(s) => (s.to_owned(), config_path),
                    None => return Ok(None),
                },
                _ => return Ok(None),
            }
        };
        // A special token is a string or an AddedToken object with `content`.
        let token = |key: &str| match &config[key] {
            serde_json::Value::String(s) => Some(s.clone()),
            v => v["content"].as_str().map(str::to_owned),
        };
        let mut env = Environment::new();
        // transformers renders with trim_blocks and lstrip_blocks, Python's string methods,
        // `raise_exception` and a `tojson` that does not escape HTML.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<Value, Error> {
                Err(Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_filter("tojson", |v: Value| -> Result<String, Error> {
            serde_json::to_string(&v)
                .map_err(|e| Error::new(ErrorKind::BadSerialization, e.to_string()))
        });
        let template = Self {
            env,
            source,
            file,
            bos_token: token("bos_token"),
            eos_token: token("eos_token"),
        };
        // Fail on load, naming the file, rather than on the first row.
        template.render(&[("user", "hello")], true)?;
        Ok(Some(template))
    }

    fn render(&self, messages: &[(&str, &str)], add_generation_prompt: bool) -> Result<String> {
        let messages: Vec<Value> = messages
            .iter()
            .map(|(role, content)| context! { role => *role, content => *content })
            .collect();
        self.env
            .render_str(
                &self.source,
                context! {
                    messages,
                    add_generation_prompt,
                    bos_token => self.bos_token.clone().unwrap_or_default(),
                    eos_token => self.eos_token.clone().unwrap_or_default(),
                },
            )
            .map_err(|e| self.error(e.to_string()))
    }

    fn error(&self, message: String) -> TrainerError {
        TrainerError::BadFile {
            file: self.file.clone(),
            message: format!("chat template: {message}"),
        }
    }

    /// The user turn with the assistant's header after it: what generation continues from.
    pub fn prompt(&self, prompt: &str) -> Result<String> {
        self.render(&[("user", prompt)], true)
    }

    /// The prompt, and the completion as the rest of the conversation the template renders
    /// (the answer and whatever closes the assistant's turn): that is what the loss covers.
    pub fn split(&self, prompt: &str, completion: &str) -> Result<Rendered> {
        let head = self.prompt(prompt)?;
        let whole = self.render(&[("user", prompt), ("assistant", completion)], false)?;
        match whole.strip_prefix(&head) {
            Some(rest) => Ok(Rendered {
                completion: rest.to_owned(),
                prompt: head,
            }),
            None => Err(self.error(
                "the conversation it renders does not begin with its generation prompt, so the \
                 completion's tokens cannot be told from the prompt's"
                    .into(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Templates rendered by transformers (`tests/fixtures/chat-templates/gen_chat_golden.py`):
    /// ours must produce the same text byte for byte.
    #[test]
    fn renders_like_transformers() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat-templates");
        let golden: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap())
                .unwrap();
        let cases = golden["cases"].as_array().unwrap();
        assert_eq!(cases.len(), 3);
        for case in cases {
            let name = case["name"].as_str().unwrap();
            let model = tempfile::tempdir().unwrap();
            let config = serde_json::json!({
                "chat_template": case["chat_template"],
                "bos_token": case["bos_token"],
                // As an AddedToken object, the other form tokenizer_config.json uses.
                "eos_token": {"content": case["eos_token"], "special": true},
            });
            std::fs::write(
                model.path().join("tokenizer_config.json"),
                config.to_string(),
            )
            .unwrap();
            let template = ChatTemplate::load(model.path()).unwrap().unwrap();
            let (prompt, completion) = (
                case["prompt"].as_str().unwrap(),
                case["completion"].as_str().unwrap(),
            );
            let split = template.split(prompt, completion).unwrap();
            assert_eq!(
                split.prompt,
                case["generation_prompt"].as_str().unwrap(),
                "{name}"
            );
            assert_eq!(
                format!("{}{}", split.prompt, split.completion),
                case["conversation"].as_str().unwrap(),
                "{name}"
            );
        }
    }

    #[test]
    fn a_broken_template_names_its_file() {
        let model = tempfile::tempdir().unwrap();
        std::fs::write(
            model.path().join("chat_template.jinja"),
            "{% for m in messages %}{{ m.content }",
        )
        .unwrap();
        let err = ChatTemplate::load(model.path()).err().unwrap().to_string();
        assert!(err.contains("chat_template.jinja: chat template:"), "{err}");

        std::fs::write(
            model.path().join("chat_template.jinja"),
            "{{ raise_exception('only system turns') }}",
        )
        .unwrap();
        let err = ChatTemplate::load(model.path()).err().unwrap().to_string();
        assert!(err.contains("only system turns"), "{err}");
    }

    #[test]
    fn no_template_is_none() {
        let model = tempfile::tempdir().unwrap();
        assert!(ChatTemplate::load(model.path()).unwrap().is_none());
        std::fs::write(
            model.path().join("tokenizer_config.json"),
            r#"{"eos_token": "</s>"}"#,
        )
        .unwrap();
        assert!(ChatTemplate::load(model.path()).unwrap().is_none());
    }
}
