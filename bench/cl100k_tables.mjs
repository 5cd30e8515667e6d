// Vocabulary tables for count_text_tokens (claude_proxy.py, section TOKENS), read from cl100k_base's ranks
// (npm gpt-tokenizer bundles them): CJK ideographs (U+4E00-9FFF) and Hangul syllables (U+AC00-D7A3) that are one
// token, and the words with an accented Latin letter that are one token (with or without a leading space),
// lowercased, 3 letters or more.  node cl100k_tables.mjs out.json; bench/fit_token_weights.py --tables packs them.
import { encode } from 'gpt-tokenizer/encoding/cl100k_base';
import bpe from 'gpt-tokenizer/esm/bpeRanks/cl100k_base';
import fs from 'fs';
const one = (lo, hi) => {
  let s = '';
  for (let i = lo; i <= hi; i++) if (encode(String.fromCodePoint(i)).length === 1) s += String.fromCodePoint(i);
  return s;
};
const accented = new Set();
for (const tok of bpe) {
  if (typeof tok !== 'string') continue;
  const word = tok.startsWith(' ') ? tok.slice(1) : tok;
  if (/^\p{L}+$/u.test(word) && /[\u00c0-\u024f\u1e00-\u1eff]/u.test(word) && [...word].length >= 3) {
    accented.add(word.toLowerCase());
  }
}
const out = { cjk: one(0x4e00, 0x9fff), hangul: one(0xac00, 0xd7a3), accented: [...accented].sort() };
fs.writeFileSync(process.argv[2], JSON.stringify(out));
