#!/usr/bin/env python3
"""Writes calibration/mimo-calib.jsonl: our own calibration set (no text from calibration/heldout).

Every sample is written here by hand or assembled from hand-written parts with a fixed seed, so the
file is reproducible: `python3 calibration/generate.py` rewrites it byte for byte.
Sets: prose, dialogue, code (Python, Rust, C, JavaScript, Go, SQL, shell), math, structured (JSON,
CSV, YAML, logs), multilingual (French, German, Spanish, Italian, Portuguese, Dutch).
"""
import json
import random

rng = random.Random(20261125)
samples = []


def add(set_name, text):
    samples.append({"set": set_name, "text": text})


# ---------------------------------------------------------------- prose
subjects = ["The river", "An old lighthouse", "The city council", "A small bakery", "The research team",
            "Our neighbour", "The mountain village", "A retired engineer", "The night train", "The library",
            "A young violinist", "The harbour master", "The orchard", "A field biologist", "The museum"]
verbs = ["had watched", "refused to ignore", "slowly rebuilt", "carefully measured", "argued about",
         "remembered", "quietly funded", "photographed", "surveyed", "repaired"]
objects = ["the flooded meadow", "every broken clock in town", "the long winter", "a forgotten map",
           "the price of bread", "the migrating geese", "the collapsed bridge", "an unfinished symphony",
           "the salt marsh", "a box of letters from 1911"]
follow = [
    "Nobody expected the results to matter, yet within a year the whole valley talked about little else.",
    "It took three attempts, two arguments and one very patient accountant before anything changed.",
    "The weather turned, the roads closed, and for a week the only news came by radio.",
    "Some of the notes were written in pencil, others in a neat hand that faded toward the margins.",
    "When the numbers finally arrived, they were smaller than hoped but larger than feared.",
    "Children followed the work from the fence, asking questions that nobody could answer.",
    "By spring the debate had moved from the kitchen table to the front page of the county paper.",
    "There were no speeches at the end, only a short list of names pinned to the door.",
]
topics = [
    ("Photosynthesis", "converts light energy into chemical energy stored in sugars; chlorophyll absorbs mostly red and blue light, which is why leaves look green."),
    ("Plate tectonics", "describes the slow motion of the lithosphere over the mantle; earthquakes and volcanoes cluster along the boundaries of the plates."),
    ("Inflation", "is the general rise of prices over time; central banks usually try to keep it low and stable by adjusting interest rates."),
    ("The printing press", "made books cheaper and faster to produce, which spread literacy and helped new ideas travel across Europe."),
    ("Vaccination", "trains the immune system to recognise a pathogen without causing the disease, so that a later infection is fought off quickly."),
    ("A compiler", "translates source code into machine instructions; it parses the text, checks types, optimises an intermediate form and emits code."),
    ("The water cycle", "moves water between oceans, air and land through evaporation, condensation, precipitation and runoff."),
    ("Coral reefs", "are built by colonies of tiny animals; warm water and acidification cause bleaching, which can kill large parts of a reef."),
    ("Supply chains", "link raw materials, factories, warehouses and shops; a delay at one port can ripple through months of deliveries."),
    ("Black holes", "form when matter collapses so densely that not even light escapes; their presence is inferred from the motion of nearby stars."),
    ("Soil erosion", "strips fertile topsoil from fields; hedges, terraces and cover crops slow the loss of ground to wind and rain."),
    ("Public key cryptography", "uses a pair of keys, one published and one secret, so strangers can exchange messages without sharing a password first."),
]
for i in range(70):
    s = f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}. {rng.choice(follow)} {rng.choice(follow)}"
    if i % 2 == 0:
        t, d = topics[i // 2 % len(topics)]
        s = f"{t} {d} " + s
    add("prose", s)

# ---------------------------------------------------------------- dialogue
names = ["Ana", "Ben", "Chloe", "Dmitri", "Emeka", "Farah", "Goro", "Hana", "Ivan", "Jules"]
exchanges = [
    ("Did you finish the report?", "Almost. The last table still has the wrong totals.", "Send it anyway, we can fix the totals tomorrow."),
    ("Is the train on time?", "It says ten minutes late, but it said that an hour ago.", "Then let's get coffee and stop looking at the board."),
    ("Why is the build failing?", "Someone renamed a function and forgot one caller.", "Classic. Do you know which commit?"),
    ("Can you water the plants while I'm away?", "Sure, how often?", "Twice a week, and the fern on Fridays only."),
    ("What did the doctor say?", "Rest, fluids and no running for two weeks.", "Two weeks? You'll go mad."),
    ("How much flour does the recipe need?", "Five hundred grams, but I only have four hundred.", "Use less water then, it will still work."),
    ("Who is presenting first?", "Marta, then the finance team.", "Good, that gives me time to fix my slides."),
    ("Have you seen my keys?", "On the shelf next to the door, under the gloves.", "Of course they are. Thanks."),
]
for i in range(45):
    a, b = rng.sample(names, 2)
    q, r, s = exchanges[i % len(exchanges)]
    extra = rng.choice(["", f"\n{b}: By the way, the meeting moved to {rng.randint(1, 5)} pm.\n{a}: Noted.",
                        f"\n{b}: Also, I owe you {rng.randint(3, 40)} euros from last week.\n{a}: Keep it for the next lunch."])
    if i % 3 == 0:
        add("dialogue", f"User: {q}\nAssistant: {r} {s}")
    else:
        add("dialogue", f"{a}: {q}\n{b}: {r}\n{a}: {s}{extra}")

# ---------------------------------------------------------------- code
fn_names = ["parse_header", "merge_ranges", "count_words", "moving_average", "clamp_all", "find_peak",
            "dedupe", "rotate_left", "checksum", "split_batches"]
py = [
    "def {f}(items):\n    result = []\n    for i, x in enumerate(items):\n        if x is None:\n            continue\n        result.append((i, x * {n}))\n    return result\n",
    "class {F}:\n    def __init__(self, size={n}):\n        self.size = size\n        self.data = [0] * size\n\n    def push(self, value):\n        self.data = self.data[1:] + [value]\n        return sum(self.data) / self.size\n",
    "import json\n\ndef {f}(path):\n    with open(path, encoding='utf-8') as fh:\n        rows = [json.loads(line) for line in fh if line.strip()]\n    return {{r['id']: r for r in rows if r.get('score', 0) > {n}}}\n",
]
rs = [
    "pub fn {f}(v: &[i64]) -> Vec<i64> {{\n    let mut out = Vec::with_capacity(v.len());\n    for w in v.windows(2) {{\n        out.push(w[1] - w[0] + {n});\n    }}\n    out\n}}\n",
    "#[derive(Debug, Clone)]\npub struct {F} {{\n    limit: usize,\n    seen: std::collections::HashSet<u64>,\n}}\n\nimpl {F} {{\n    pub fn insert(&mut self, key: u64) -> bool {{\n        self.seen.len() < self.limit && self.seen.insert(key ^ {n})\n    }}\n}}\n",
    "fn {f}(s: &str) -> Result<u32, std::num::ParseIntError> {{\n    let n: u32 = s.trim().parse()?;\n    Ok(n.saturating_mul({n}))\n}}\n",
]
c = [
    "#include <stdio.h>\n\nstatic int {f}(const int *a, int n) {{\n    int best = a[0];\n    for (int i = 1; i < n; i++) {{\n        if (a[i] > best) best = a[i];\n    }}\n    return best + {n};\n}}\n",
    "unsigned {f}(const unsigned char *p, size_t len) {{\n    unsigned h = {n}u;\n    while (len--) h = (h << 5) + h + *p++;\n    return h;\n}}\n",
]
js = [
    "export function {f}(list) {{\n  return list\n    .filter((x) => x.active)\n    .map((x) => ({{ id: x.id, total: x.items.length * {n} }}))\n    .sort((a, b) => b.total - a.total);\n}}\n",
    "const {f} = async (url) => {{\n  const res = await fetch(url, {{ headers: {{ Accept: 'application/json' }} }});\n  if (!res.ok) throw new Error(`status ${{res.status}}`);\n  const body = await res.json();\n  return body.items.slice(0, {n});\n}};\n",
]
go = [
    "func {F}(xs []float64) float64 {{\n\tif len(xs) == 0 {{\n\t\treturn 0\n\t}}\n\tsum := 0.0\n\tfor _, x := range xs {{\n\t\tsum += x\n\t}}\n\treturn sum / float64(len(xs)) * {n}\n}}\n",
]
sql = [
    "SELECT c.name, COUNT(o.id) AS orders, SUM(o.total) AS revenue\nFROM customers c\nJOIN orders o ON o.customer_id = c.id\nWHERE o.created_at >= DATE '2024-0{m}-01'\nGROUP BY c.name\nHAVING COUNT(o.id) > {n}\nORDER BY revenue DESC;\n",
    "CREATE TABLE {f} (\n  id INTEGER PRIMARY KEY,\n  label TEXT NOT NULL,\n  weight REAL DEFAULT {n}.0,\n  created TIMESTAMP DEFAULT CURRENT_TIMESTAMP\n);\n",
]
sh = [
    "#!/usr/bin/env bash\nset -euo pipefail\nfor f in data/*.csv; do\n  lines=$(wc -l < \"$f\")\n  if [ \"$lines\" -gt {n} ]; then\n    echo \"$f: $lines lines\"\n  fi\ndone\n",
]
langs = [("python", py), ("rust", rs), ("c", c), ("javascript", js), ("go", go), ("sql", sql), ("shell", sh)]
for i in range(70):
    lang, templates = langs[i % len(langs)]
    f = rng.choice(fn_names)
    F = "".join(p.capitalize() for p in f.split("_"))
    t = rng.choice(templates).format(f=f, F=F, n=rng.randint(2, 99), m=rng.randint(1, 9))
    add("code", f"// {lang}\n{t}" if lang not in ("python", "shell", "sql") else t)

# ---------------------------------------------------------------- math
for i in range(50):
    a, b, cc = rng.randint(2, 60), rng.randint(2, 60), rng.randint(1, 9)
    kind = i % 5
    if kind == 0:
        add("math", f"Solve {a}x + {b} = {a * cc + b}. Subtract {b} from both sides: {a}x = {a * cc}. Divide by {a}: x = {cc}.")
    elif kind == 1:
        add("math", f"The area of a rectangle with sides {a} cm and {b} cm is {a} * {b} = {a * b} cm^2, and its perimeter is 2({a} + {b}) = {2 * (a + b)} cm.")
    elif kind == 2:
        add("math", f"Let f(x) = {cc}x^2 + {a}x. Then f'(x) = {2 * cc}x + {a}, and f'(x) = 0 at x = -{a}/{2 * cc}. Since {cc} > 0 this is a minimum.")
    elif kind == 3:
        p = a * b
        add("math", f"A shop sells {a} boxes of {b} pencils. That is {p} pencils. If {cc} boxes are returned, {p - cc * b} pencils remain sold, a drop of {100 * cc / a:.1f} percent.")
    else:
        add("math", f"Theorem. For every integer n >= 1, 1 + 2 + ... + n = n(n+1)/2. Proof by induction: for n = 1 both sides equal 1. If it holds for n, adding n+1 gives n(n+1)/2 + (n+1) = (n+1)(n+2)/2. For n = {a} the sum is {a * (a + 1) // 2}.")

# ---------------------------------------------------------------- structured
cities = ["Lisbon", "Oslo", "Nairobi", "Lima", "Osaka", "Quebec", "Tbilisi", "Perth", "Accra", "Hanoi"]
for i in range(40):
    kind = i % 4
    if kind == 0:
        rec = {"id": 1000 + i, "city": rng.choice(cities), "temp_c": round(rng.uniform(-10, 35), 1),
               "tags": rng.sample(["rain", "wind", "sun", "fog", "snow"], 2), "ok": bool(i % 3)}
        add("structured", json.dumps(rec, indent=2))
    elif kind == 1:
        rows = ["date,city,sales,returns"] + [f"2025-0{rng.randint(1, 9)}-{rng.randint(10, 28)},{rng.choice(cities)},{rng.randint(10, 900)},{rng.randint(0, 30)}" for _ in range(6)]
        add("structured", "\n".join(rows))
    elif kind == 2:
        add("structured", f"service:\n  name: api-{i}\n  replicas: {rng.randint(1, 6)}\n  image: registry.local/api:{rng.randint(1, 9)}.{rng.randint(0, 20)}\n  env:\n    - LOG_LEVEL=info\n    - REGION={rng.choice(cities).lower()}\n  ports: [{rng.randint(8000, 8100)}]\n")
    else:
        lines = [f"2025-11-{rng.randint(10, 28)}T{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}Z {rng.choice(['INFO', 'WARN', 'ERROR', 'DEBUG'])} worker-{rng.randint(1, 8)} {rng.choice(['request done in', 'retrying after', 'queue depth', 'cache miss for key'])} {rng.randint(1, 5000)}" for _ in range(5)]
        add("structured", "\n".join(lines))

# ---------------------------------------------------------------- multilingual
ml = {
    "fr": ["Le marché ouvre à sept heures et les premiers clients arrivent avant le pain.",
           "Il a plu toute la nuit, mais le chemin vers le village reste praticable.",
           "Nous avons visité le musée puis mangé une soupe de poisson près du port.",
           "La réunion est reportée à jeudi, faute de salle disponible."],
    "de": ["Der Zug nach München fällt heute wegen Bauarbeiten leider aus.",
           "Im Herbst sammeln die Kinder Kastanien im Park hinter der Schule.",
           "Die neue Brücke verbindet die beiden Stadtteile seit letztem Sommer.",
           "Bitte schließen Sie das Fenster, bevor Sie das Büro verlassen."],
    "es": ["La biblioteca amplió su horario para los estudiantes durante los exámenes.",
           "Mi abuela cocina lentejas todos los domingos y siempre sobra comida.",
           "El equipo ganó el partido en el último minuto con un gol de cabeza.",
           "Los precios del alquiler subieron otra vez en el centro de la ciudad."],
    "it": ["Il treno per Firenze parte dal binario tre tra dieci minuti.",
           "Abbiamo raccolto le olive a novembre, con un tempo ancora mite.",
           "La piazza si riempie di musica ogni sera d'estate."],
    "pt": ["O barco saiu cedo do porto e voltou com pouca pesca.",
           "A escola abriu uma horta onde os alunos plantam tomates e alface.",
           "Choveu tanto que o rio transbordou perto da ponte velha."],
    "nl": ["De fietsenstalling bij het station is weer helemaal vol.",
           "We hebben op zondag pannenkoeken gegeten bij oma in Utrecht.",
           "Het museum is op maandag gesloten, behalve in de zomervakantie."],
}
keys = sorted(ml)
for i in range(40):
    lang = keys[i % len(keys)]
    s = rng.sample(ml[lang], 2)
    add("multilingual", f"[{lang}] " + " ".join(s))

with open("calibration/mimo-calib.jsonl", "w", encoding="utf-8") as fh:
    for s in samples:
        fh.write(json.dumps(s, ensure_ascii=False) + "\n")
print(len(samples), "samples")
