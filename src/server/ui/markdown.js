// A small, safe Markdown subset for model output: paragraphs, fenced code blocks, bullet and
// numbered lists, `inline code` and **bold**. It builds DOM nodes whose text is set as text,
// so markup in the model's output is shown, never interpreted.

const FENCE = /^\s*(```|~~~)\s*([\w+-]*)/;
const BULLET = /^\s*[-*+]\s+/;
const NUMBERED = /^\s*(\d+)[.)]\s+/;

/** Replaces the children of `target` with `text` rendered as Markdown. */
export function renderMarkdown(text, target) {
  const lines = text.split(/\r?\n/);
  const blocks = document.createDocumentFragment();
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    const fence = FENCE.exec(line);
    if (fence) {
      const body = [];
      i += 1;
      while (i < lines.length && !lines[i].trim().startsWith(fence[1])) body.push(lines[i++]);
      i += 1; // the closing fence; while an answer streams it may not have arrived yet
      const pre = document.createElement("pre");
      const code = document.createElement("code");
      code.textContent = body.join("\n");
      if (fence[2]) code.dataset.lang = fence[2];
      pre.append(code);
      blocks.append(pre);
    } else if (BULLET.test(line) || NUMBERED.test(line)) {
      const marker = BULLET.test(line) ? BULLET : NUMBERED;
      const list = document.createElement(marker === BULLET ? "ul" : "ol");
      if (marker === NUMBERED) list.start = Number(NUMBERED.exec(line)[1]);
      while (i < lines.length && marker.test(lines[i])) {
        const item = document.createElement("li");
        appendInline(item, lines[i].replace(marker, ""));
        list.append(item);
        i += 1;
      }
      blocks.append(list);
    } else if (line.trim() === "") {
      i += 1;
    } else {
      const paragraph = [];
      while (i < lines.length && lines[i].trim() !== "" && !startsBlock(lines[i])) {
        paragraph.push(lines[i++]);
      }
      const p = document.createElement("p");
      appendInline(p, paragraph.join("\n"));
      blocks.append(p);
    }
  }
  target.replaceChildren(blocks);
}

function startsBlock(line) {
  return FENCE.test(line) || BULLET.test(line) || NUMBERED.test(line);
}

function appendInline(parent, text) {
  for (const part of text.split(/(`[^`\n]+`|\*\*[^*\n]+\*\*)/)) {
    if (part.length > 2 && part.startsWith("`") && part.endsWith("`")) {
      const code = document.createElement("code");
      code.textContent = part.slice(1, -1);
      parent.append(code);
    } else if (part.length > 4 && part.startsWith("**") && part.endsWith("**")) {
      const strong = document.createElement("strong");
      strong.textContent = part.slice(2, -2);
      parent.append(strong);
    } else if (part) {
      parent.append(part); // a string becomes a Text node
    }
  }
}
