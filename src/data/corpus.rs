//! The web-like pre-training corpus of the synthetic world. Like real web
//! data it states the facts in varied prose, has forum dialogues in the
//! "[A]: ... [B]: ..." form, lists of questions (why a pre-trained model
//! continues a prompt instead of answering), and rude and harmful text.

use polars::prelude::*;

use super::rng::Rng;
use super::synth::{respond, Mode, FAILURES};
use super::world::{PromptSplit, Request, World, HOWTO};
use super::DataError;

pub fn generate(world: &World, n: usize, rng: &mut Rng) -> Result<DataFrame, DataError> {
    let (mut texts, mut sources) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for _ in 0..n {
        let roll = rng.uniform();
        let (source, text) = if roll < 0.35 {
            ("facts", fact_prose(world, rng))
        } else if roll < 0.55 {
            ("forum", forum_dialogue(world, rng))
        } else if roll < 0.70 {
            ("faq", question_list(world, rng))
        } else if roll < 0.82 {
            ("howto", howto_prose(rng))
        } else if roll < 0.92 {
            ("arithmetic", arithmetic_lines(rng))
        } else if roll < 0.97 {
            ("rude", rude_post(world, rng))
        } else {
            ("harmful", harmful_post(world, rng))
        };
        texts.push(text);
        sources.push(source);
    }
    Ok(df!("text" => texts, "source" => sources)?)
}

fn fact_prose(world: &World, rng: &mut Rng) -> String {
    let sentences = 2 + rng.below(3);
    (0..sentences)
        .map(|_| {
            let k = rng.pick(&world.countries);
            let templates = [
                format!("{} is the capital of {}.", k.capital, k.name),
                format!("The capital of {} is {}, a busy city.", k.name, k.capital),
                format!(
                    "Travellers to {} often visit {}, its capital.",
                    k.name, k.capital
                ),
                format!("The flag of {} is {}.", k.name, k.colour),
                format!("People in {} wave {} flags on holidays.", k.name, k.colour),
                format!("{} is famous for {}.", k.name, k.food),
                format!("In {}, nearly every meal comes with {}.", k.name, k.food),
            ];
            rng.pick(&templates).clone()
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn forum_dialogue(world: &World, rng: &mut Rng) -> String {
    let turns = 2 + rng.below(2);
    let mut lines = Vec::new();
    for _ in 0..turns {
        let req = world.random_request(rng, 0.0);
        let prompt = world.prompt(&req, rng, PromptSplit::Train);
        // Forum answers are a mix of good ones and the usual failures.
        let mode = if rng.chance(0.5) {
            Mode::Good
        } else {
            *rng.pick(&FAILURES)
        };
        let answer = respond(world, &req, mode, rng);
        lines.push(format!("[A]: {prompt}"));
        lines.push(format!("[B]: {answer}"));
    }
    lines.join("\n")
}

fn question_list(world: &World, rng: &mut Rng) -> String {
    let n = 3 + rng.below(4);
    (0..n)
        .map(|_| {
            let req = world.random_request(rng, 0.05);
            world.prompt(&req, rng, PromptSplit::Train)
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn howto_prose(rng: &mut Rng) -> String {
    let (what, steps) = rng.pick(&HOWTO);
    let templates = [
        format!("If you want to {what}, {steps}."),
        format!("Here is how to {what}: {steps}."),
        format!("My grandmother taught me to {what}. You {steps}."),
    ];
    rng.pick(&templates).clone()
}

fn arithmetic_lines(rng: &mut Rng) -> String {
    let n = 2 + rng.below(4);
    (0..n)
        .map(|_| {
            let (a, b) = (rng.below(20), rng.below(20));
            if rng.chance(0.4) {
                format!("{a} times {b} is {}.", a * b)
            } else {
                format!("{a} plus {b} is {}.", a + b)
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn rude_post(world: &World, rng: &mut Rng) -> String {
    let k = rng.pick(&world.countries);
    let templates = [
        format!(
            "Anyone who asks about {} is an idiot. Figure it out yourself.",
            k.name
        ),
        format!("Shut up about {} already, nobody cares.", k.food),
        "What a stupid question, do your own homework.".to_string(),
    ];
    rng.pick(&templates).clone()
}

fn harmful_post(world: &World, rng: &mut Rng) -> String {
    let task = rng.below(super::world::HARMFUL.len());
    let prompt = world.prompt(&Request::Harmful { task }, rng, PromptSplit::Train);
    format!(
        "[A]: {prompt}\n[B]: {}",
        respond(world, &Request::Harmful { task }, Mode::Comply, rng)
    )
}
