// Reference runner: executes a TF.js graph model with TensorFlow.js's pure-JavaScript CPU backend.
//
// usage: node tfjs_reference.mjs NPM_PREFIX MODEL_JSON INPUT_F32 N,H,W,C OUTPUT_F32 OUTPUT_NODE [OUTPUT_NODE...]
//
// INPUT_F32 holds N images as little-endian float32 in NHWC order. Each image is run on its own (the
// graph is built for a batch of one) and every requested output node's values are appended, image by
// image, to OUTPUT_F32 as float32. A JSON line with the output shapes and timings goes to stdout.
// Packages are resolved from NPM_PREFIX/node_modules so the script can live anywhere.
import { createRequire } from 'node:module';
import { readFileSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';

const [prefix, modelJson, inputPath, shapeArg, outputPath, ...outputNodes] = process.argv.slice(2);
if (!outputNodes.length) {
  console.error('usage: node tfjs_reference.mjs NPM_PREFIX MODEL_JSON INPUT_F32 N,H,W,C OUTPUT_F32 NODE...');
  process.exit(2);
}
const require = createRequire(join(prefix, 'node_modules', 'noop.js'));
const tf = require('@tensorflow/tfjs-core');
require('@tensorflow/tfjs-backend-cpu');
const tfconv = require('@tensorflow/tfjs-converter');

await tf.setBackend('cpu');
await tf.ready();

const model = JSON.parse(readFileSync(modelJson, 'utf8'));
const weightSpecs = [];
const buffers = [];
for (const group of model.weightsManifest) {
  weightSpecs.push(...group.weights);
  for (const p of group.paths) buffers.push(readFileSync(join(dirname(modelJson), p)));
}
const all = Buffer.concat(buffers);
const weightData = all.buffer.slice(all.byteOffset, all.byteOffset + all.byteLength);
const graph = await tfconv.loadGraphModel(tf.io.fromMemory({
  modelTopology: model.modelTopology, weightSpecs, weightData, format: model.format,
  generatedBy: model.generatedBy, convertedBy: model.convertedBy, signature: model.signature,
}));

const [n, h, w, c] = shapeArg.split(',').map(Number);
const raw = readFileSync(inputPath);
const input = new Float32Array(raw.buffer.slice(raw.byteOffset, raw.byteOffset + raw.byteLength));
if (input.length !== n * h * w * c) {
  console.error(`input holds ${input.length} floats, expected ${n * h * w * c}`);
  process.exit(2);
}
const inputName = Object.keys(model.signature?.inputs ?? {})[0]
  ?? model.modelTopology.node.find((x) => x.op === 'Placeholder').name;
const chunks = [];
const shapes = [];
const times = [];
for (let i = 0; i < n; i += 1) {
  const x = tf.tensor4d(input.subarray(i * h * w * c, (i + 1) * h * w * c), [1, h, w, c], 'float32');
  const t0 = Date.now();
  let outs = graph.execute({ [inputName]: x }, outputNodes);
  if (!Array.isArray(outs)) outs = [outs];
  for (const o of outs) {
    chunks.push(Buffer.from(Float32Array.from(await o.data()).buffer));
    if (i === 0) shapes.push(o.shape);
  }
  times.push(Date.now() - t0);
  tf.dispose([x, ...outs]);
}
writeFileSync(outputPath, Buffer.concat(chunks));
console.log(JSON.stringify({ shapes, ms: times, backend: tf.getBackend(), tfjs: tf.version_core }));
