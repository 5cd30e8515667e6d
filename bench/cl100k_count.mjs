// cl100k_base token counts of a JSON list of texts (gpt-tokenizer bundles the ranks). node cl100k_count.mjs in.json out.json
import { encode } from 'gpt-tokenizer/encoding/cl100k_base';
import fs from 'fs';
const texts = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const out = texts.map(t => encode(t, {allowedSpecial: new Set(), disallowedSpecial: new Set()}).length);
fs.writeFileSync(process.argv[3], JSON.stringify(out));
