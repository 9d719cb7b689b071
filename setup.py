"""refconv_mm: RefConv for MMDetection, MMSegmentation and MMPretrain (OpenMMLab 2.x plugin)."""
import os
import os.path as osp
import shutil

from setuptools import find_packages, setup

HERE = osp.dirname(osp.abspath(__file__))


def readme() -> str:
    with open(osp.join(HERE, 'README.md'), encoding='utf-8') as f:
        return f.read()


def version() -> str:
    scope = {}
    with open(osp.join(HERE, 'refconv_mm', 'version.py')) as f:
        exec(f.read(), scope)
    return scope['__version__']


def parse_requirements(path: str) -> list:
    """Requirement lines of ``path`` (relative to the repo), comments and blanks dropped."""
    with open(osp.join(HERE, path)) as f:
        lines = (line.split('#')[0].strip() for line in f)
        return [line for line in lines if line]


def mim_files() -> list:
    """Every file under refconv_mm/.mim, listed (old setuptools reads '**' as a plain '*')."""
    root = osp.join(HERE, 'refconv_mm')
    return sorted(osp.relpath(osp.join(d, f), root)
                  for d, _, files in os.walk(osp.join(root, '.mim'), followlinks=True)
                  for f in files if not f.endswith('.pyc'))


def add_mim_extension() -> None:
    """Ship configs/ and tools/ inside the package under ``.mim``, as OpenMMLab packages do."""
    mode = 'symlink' if os.environ.get('PIP_EDITABLE_MODE') or 'develop' in os.sys.argv \
        or any('editable' in a for a in os.sys.argv) else 'copy'
    mim = osp.join(HERE, 'refconv_mm', '.mim')
    os.makedirs(mim, exist_ok=True)
    for name in ('configs', 'tools'):
        src, dst = osp.join(HERE, name), osp.join(mim, name)
        if osp.islink(dst) or osp.isfile(dst):
            os.remove(dst)
        elif osp.isdir(dst):
            shutil.rmtree(dst)
        if mode == 'symlink':
            os.symlink(osp.relpath(src, mim), dst, target_is_directory=True)
        else:
            shutil.copytree(src, dst)


if __name__ == '__main__':
    add_mim_extension()
    setup(
        name='refconv_mm',
        version=version(),
        description='RefConv (Re-parameterized Refocusing Convolution) for MMDetection, '
        'MMSegmentation and MMPretrain',
        long_description=readme(),
        long_description_content_type='text/markdown',
        license='Apache License 2.0',
        packages=find_packages(exclude=('configs', 'tools', 'tests')),
        include_package_data=True,
        package_data={'refconv_mm': mim_files()},
        # Python 3.8 (OpenMMLab's `conda create -n openmmlab python=3.8`) to 3.11, the pinned one.
        python_requires='>=3.8,<3.12',
        # Only what refconv_mm itself needs, as ranges: torch, mmcv and mmengine are the user's
        # (mmcv's compiled ops match one torch), so pip never replaces them; ranges are checked
        # at import (refconv_mm/compat.py). The pinned stack is requirements/runtime.txt.
        install_requires=parse_requirements('requirements/install.txt'),
        extras_require=dict(
            mim=parse_requirements('requirements/mminstall.txt'),
            mmdet=['mmdet>=3.0.0,<3.4.0'],
            # mmseg.utils imports ftfy and regex without declaring them.
            mmseg=['mmsegmentation>=1.0.0,<1.3.0', 'ftfy', 'regex'],
            mmpretrain=['mmpretrain>=1.0.0,<1.3.0'],
            tests=parse_requirements('requirements/tests.txt'),
            # docs/deploy.md; requirements/deploy.txt has the same pins
            deploy=['mmdeploy==1.3.1', 'onnx==1.17.0', 'protobuf==3.20.2',
                    'onnxruntime==1.26.0']),
        zip_safe=False)
