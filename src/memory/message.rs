//! Error messages kept in shared memory (a flush's last error, a `wsusage_flush()` outcome):
//! fixed, NUL-terminated buffers, since nothing under the wsusage lock may allocate.

/// Longest message kept (bytes, including the terminator).
pub const MESSAGE_LEN: usize = 256;

pub type Message = [u8; MESSAGE_LEN];

pub const EMPTY: Message = [0; MESSAGE_LEN];

/// Store `message` in `buffer`, cut at a character boundary.
pub fn write(buffer: &mut Message, message: &str) {
    let mut end = message.len().min(MESSAGE_LEN - 1);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    *buffer = EMPTY;
    buffer[..end].copy_from_slice(&message.as_bytes()[..end]);
}

/// The message stored by [`write`].
pub fn read(buffer: &Message) -> String {
    let len = buffer.iter().position(|&b| b == 0).unwrap_or(MESSAGE_LEN);
    String::from_utf8_lossy(&buffer[..len]).into_owned()
}
