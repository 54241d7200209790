#!/usr/bin/env python3
"""Renders the reference outputs for tests/test_chat.cpp with Python jinja2.

The environment mirrors HuggingFace transformers' apply_chat_template: ImmutableSandboxedEnvironment
with trim_blocks, lstrip_blocks and loopcontrols, a json.dumps-based tojson filter, and the globals
raise_exception and strftime_now (fixed to 2026-01-15 so the C++ test can pin the same date).

Run from anywhere:  python3 tests/data/chat/render_reference.py
Writes expected/TEMPLATE__CASE.txt for every *.jinja x conversations.json case and
expected/feature__NAME.txt for every features.json case. A render that raises writes
"ERROR: <message>" (raise_exception) or "ERROR(<ExceptionType>): <message>" (anything else).
Also splits the cases into inputs/ (plain files the C++ test reads without a JSON parser):
cases.txt, CASE.messages.json, CASE.tools.json, CASE.extra.json, CASE.options.txt,
features.txt, feature__NAME.jinja, feature__NAME.vars.json.
"""
import datetime
import glob
import json
import os

import jinja2
import jinja2.ext
import jinja2.sandbox

HERE = os.path.dirname(os.path.abspath(__file__))
FIXED_NOW = datetime.datetime(2026, 1, 15, 10, 30, 0)


def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def strftime_now(fmt):
    return FIXED_NOW.strftime(fmt)


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def make_env():
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[jinja2.ext.loopcontrols])
    env.filters['tojson'] = tojson
    env.globals['raise_exception'] = raise_exception
    env.globals['strftime_now'] = strftime_now
    return env


def render(env, source, context):
    try:
        return env.from_string(source).render(**context)
    except jinja2.exceptions.TemplateError as e:
        if type(e) is jinja2.exceptions.TemplateError:
            return 'ERROR: ' + str(e)
        return 'ERROR(%s): %s' % (type(e).__name__, e)
    except Exception as e:  # TypeError and friends from the template's own operations
        return 'ERROR(%s): %s' % (type(e).__name__, e)


def write(path, text):
    with open(path, 'w', encoding='utf-8', newline='') as f:
        f.write(text)


def main():
    env = make_env()
    out_dir = os.path.join(HERE, 'expected')
    os.makedirs(out_dir, exist_ok=True)
    in_dir = os.path.join(HERE, 'inputs')
    os.makedirs(in_dir, exist_ok=True)
    for old in glob.glob(os.path.join(out_dir, '*.txt')) + glob.glob(os.path.join(in_dir, '*')):
        os.remove(old)
    dumps = lambda x: json.dumps(x, ensure_ascii=False)
    with open(os.path.join(HERE, 'conversations.json'), encoding='utf-8') as f:
        cases = json.load(f)
    write(os.path.join(in_dir, 'cases.txt'), ''.join(c['name'] + '\n' for c in cases))
    for case in cases:
        name = case['name']
        assert '\n' not in case['bos_token'] + case['eos_token']
        write(os.path.join(in_dir, name + '.messages.json'), dumps(case['messages']))
        if 'tools' in case:
            write(os.path.join(in_dir, name + '.tools.json'), dumps(case['tools']))
        if 'extra' in case:
            write(os.path.join(in_dir, name + '.extra.json'), dumps(case['extra']))
        write(os.path.join(in_dir, name + '.options.txt'),
              'add_generation_prompt=%d\nenable_thinking=%d\nbos_token=%s\neos_token=%s\n' % (
                  case['add_generation_prompt'], {True: 1, False: 0}.get(case.get('enable_thinking'), -1),
                  case['bos_token'], case['eos_token']))
    for template_path in sorted(glob.glob(os.path.join(HERE, '*.jinja'))):
        name = os.path.basename(template_path)[:-len('.jinja')]
        with open(template_path, encoding='utf-8', newline='') as f:
            source = f.read()
        for case in cases:
            context = {
                'messages': case['messages'],
                'add_generation_prompt': case['add_generation_prompt'],
                'bos_token': case['bos_token'],
                'eos_token': case['eos_token'],
            }
            if 'tools' in case:
                context['tools'] = case['tools']
            if 'enable_thinking' in case:
                context['enable_thinking'] = case['enable_thinking']
            context.update(case.get('extra', {}))
            write(os.path.join(out_dir, '%s__%s.txt' % (name, case['name'])), render(env, source, context))
    with open(os.path.join(HERE, 'features.json'), encoding='utf-8') as f:
        features = json.load(f)
    write(os.path.join(in_dir, 'features.txt'), ''.join(f['name'] + '\n' for f in features))
    for feature in features:
        write(os.path.join(in_dir, 'feature__%s.jinja' % feature['name']), feature['template'])
        write(os.path.join(in_dir, 'feature__%s.vars.json' % feature['name']), dumps(feature.get('vars', {})))
    for feature in features:
        context = {'messages': [], 'add_generation_prompt': True, 'bos_token': '', 'eos_token': ''}
        context.update(feature.get('vars', {}))
        write(os.path.join(out_dir, 'feature__%s.txt' % feature['name']), render(env, feature['template'], context))


if __name__ == '__main__':
    main()
