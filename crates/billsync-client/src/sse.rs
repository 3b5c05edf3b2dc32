//! A Server-Sent Events parser fed with the response body's chunks as they come: lines may
//! end in `\n`, `\r\n` or `\r`, and a chunk may end anywhere (inside a line, between `\r` and
//! `\n`, inside a UTF-8 character).

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// `event:`; `message` when absent, as the specification says.
    pub event: String,
    /// The `data:` lines joined with `\n`.
    pub data: String,
    /// `id:` of this event, if it had one.
    pub id: Option<String>,
}

/// The parser's state between chunks.
#[derive(Debug, Default)]
pub struct Parser {
    /// Bytes of a line not yet ended.
    line: Vec<u8>,
    /// The last chunk ended in `\r`: a `\n` starting the next one belongs to that line end.
    after_cr: bool,
    event: Option<String>,
    data: Option<String>,
    id: Option<String>,
}

impl Parser {
    /// Feeds a chunk; returns the events it completed, in order.
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<Frame> {
        let mut frames = Vec::new();
        let mut rest = chunk;
        if self.after_cr {
            self.after_cr = false;
            if let Some(stripped) = rest.strip_prefix(b"\n") {
                rest = stripped;
            }
        }
        while let Some(end) = rest.iter().position(|b| *b == b'\n' || *b == b'\r') {
            self.line.extend_from_slice(&rest[..end]);
            let line = std::mem::take(&mut self.line);
            if let Some(frame) = self.line_ended(&line) {
                frames.push(frame);
            }
            let cr = rest[end] == b'\r';
            rest = &rest[end + 1..];
            if cr {
                match rest.first() {
                    Some(b'\n') => rest = &rest[1..],
                    None => self.after_cr = true,
                    Some(_) => {}
                }
            }
        }
        self.line.extend_from_slice(rest);
        frames
    }

    fn line_ended(&mut self, line: &[u8]) -> Option<Frame> {
        if line.is_empty() {
            return self.dispatch();
        }
        if line[0] == b':' {
            return None; // a comment: the heartbeat
        }
        let line = String::from_utf8_lossy(line);
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (&*line, ""),
        };
        match field {
            "event" => self.event = Some(value.to_owned()),
            "data" => match &mut self.data {
                Some(data) => {
                    data.push('\n');
                    data.push_str(value);
                }
                None => self.data = Some(value.to_owned()),
            },
            "id" if !value.contains('\0') => self.id = Some(value.to_owned()),
            _ => {} // `retry` and unknown fields are ignored
        }
        None
    }

    /// A blank line: the event so far, if it had data.
    fn dispatch(&mut self) -> Option<Frame> {
        let event = self.event.take();
        let id = self.id.take();
        let data = self.data.take()?;
        Some(Frame {
            event: event.unwrap_or_else(|| "message".to_owned()),
            data,
            id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(event: &str, data: &str, id: Option<&str>) -> Frame {
        Frame {
            event: event.to_owned(),
            data: data.to_owned(),
            id: id.map(str::to_owned),
        }
    }

    #[test]
    fn events_comments_and_ids_are_read_as_the_server_writes_them() {
        let text = "event: hello\ndata: {\"protocol\":1}\n\n:heartbeat\n\n\
                    event: ready\ndata: {\"cursor\":\"1-2\"}\nid: 1-2\n\n";
        let frames = Parser::default().feed(text.as_bytes());
        assert_eq!(
            frames,
            [
                frame("hello", "{\"protocol\":1}", None),
                frame("ready", "{\"cursor\":\"1-2\"}", Some("1-2")),
            ]
        );
    }

    #[test]
    fn an_event_split_anywhere_across_chunks_is_read_whole() {
        let text = "event: tenant\r\ndata: {\"tenant_id\":\"acmé\"}\r\nid: 7-9\r\n\r\nevent: x\rdata: y\r\r";
        let whole = Parser::default().feed(text.as_bytes());
        assert_eq!(whole.len(), 2);
        for size in 1..text.len() {
            let mut parser = Parser::default();
            let frames: Vec<Frame> = (text.as_bytes().chunks(size))
                .flat_map(|chunk| parser.feed(chunk))
                .collect();
            assert_eq!(frames, whole, "chunks of {size} bytes");
        }
        assert_eq!(
            whole[0],
            frame("tenant", "{\"tenant_id\":\"acmé\"}", Some("7-9"))
        );
        assert_eq!(whole[1], frame("x", "y", None));
    }

    #[test]
    fn data_lines_join_and_an_event_without_data_is_not_dispatched() {
        let mut parser = Parser::default();
        let frames = parser.feed(b"data:a\ndata: b\n\nevent: empty\n\ndata\n\n");
        assert_eq!(
            frames,
            [frame("message", "a\nb", None), frame("message", "", None)]
        );
        assert!(parser.feed(b"data: unfinished\n").is_empty());
        assert_eq!(parser.feed(b"\n"), [frame("message", "unfinished", None)]);
    }
}
